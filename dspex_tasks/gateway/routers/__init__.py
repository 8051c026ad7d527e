"""The gateway's routes, one ``APIRouter`` per resource: meta, signatures, jobs, programs, optimizations.

``create_gateway`` includes them in that order (routes match in registration order). Routes reach the
:class:`~dspex_tasks.gateway.state.Gateway` through the :data:`.common.GatewayDep` dependency, and declare the
right their API key needs by taking a dependency of :mod:`.access` (checked for every route at start).
"""
