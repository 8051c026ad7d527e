"""A publish to a broker that does not answer is a typed error naming it, not kombu's OperationalError."""

from __future__ import annotations

import pytest

from dspex_tasks import errors
from dspex_tasks.app import create_app
from dspex_tasks.connections import typed_store_full
from dspex_tasks.settings import Settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("broker", "what", "variable"), [
    ("amqp://guest:secret@127.0.0.1:1//", "cannot reach RabbitMQ", "DSPEX_BROKER_URL"),
    ("redis://:secretpw@127.0.0.1:1/0", "cannot reach Redis", "DSPEX_REDIS_URL"),
])
def test_an_unreachable_broker_is_backend_unavailable_naming_it(broker: str, what: str, variable: str) -> None:
    settings = Settings(broker_url=broker, redis_socket_timeout_s=2)
    app = create_app(settings)
    app.conf.broker_connection_max_retries = 0
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_retries": 0}
    try:
        with pytest.raises(errors.BackendUnavailable) as caught, typed_store_full(settings.broker):
            app.send_task("dspex.qa", kwargs={"inputs": {"question": "x"}}, queue="nobody", retry=False)
    finally:
        app.close()
    text = str(caught.value)
    assert what in text and variable in text and "nothing was enqueued" in text
    assert "secret" not in text
