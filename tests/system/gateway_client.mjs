// A client of the dspex gateway in plain Node (built-in fetch, no packages, no Python): what a service in
// another language does. Reads GATEWAY_URL and GATEWAY_KEY; prints one JSON document of what it saw.

const BASE = process.env.GATEWAY_URL;
const KEY = process.env.GATEWAY_KEY;
const AUTH = { Authorization: `Bearer ${KEY}` };

async function call(method, path, body, headers = AUTH) {
  const init = { method, headers: { ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(BASE + path, init);
  const text = await res.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON (an event stream)
  }
  return { status: res.status, type: res.headers.get("content-type"), location: res.headers.get("location"),
           retryAfter: res.headers.get("retry-after"), json, text };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const out = {};

// no key: a problem document
const anon = await call("GET", "/v1/signatures", undefined, {});
out.unauthorized = { status: anon.status, type: anon.type, code: anon.json?.code };

// the registry and the typed OpenAPI document
const sigs = await call("GET", "/v1/signatures");
out.signatures = Object.keys(sigs.json.signatures).sort();
const doc = await call("GET", "/openapi.json");
out.questionType = doc.json.components.schemas["qa.inputs"].properties.question.type;

// submit, then poll the job until it is done
const submitted = await call("POST", "/v1/signatures/qa/jobs", { inputs: { question: "Why is the sky blue?" },
                                                               session: "node" });
out.submit = { status: submitted.status, location: submitted.location, state: submitted.json?.state };
let job = null;
let polls = 0;
const deadline = Date.now() + 30000;
while (Date.now() < deadline) {
  job = await call("GET", submitted.location);
  polls += 1;
  if (job.json?.state === "SUCCESS" || job.json?.state === "FAILURE") break;
  await sleep(50);
}
out.polled = { status: job.status, polls, job: job.json };

// run and wait
const ran = await call("POST", "/v1/signatures/qa:run?timeout=30", { inputs: { question: "And the sea?" } });
out.run = { status: ran.status, job: ran.json };

// the same job's event stream: already done, so one 'result' event with its result
const events = await call("GET", `/v1/jobs/${ran.json.id}/events`);
out.events = { status: events.status, type: events.type, text: events.text };

// a bad input: 422 with the field path
const bad = await call("POST", "/v1/signatures/qa/jobs", { inputs: { question: 3 } });
out.invalid = { status: bad.status, type: bad.type, code: bad.json?.code, errors: bad.json?.errors };

// programs: store one, run with it, roll back
const put = await call("PUT", "/v1/sessions/node/programs/qa", { state: { demos: [] }, signature: "qa" });
const withProgram = await call("POST", "/v1/signatures/qa:run", { inputs: { question: "q" }, session: "node" });
out.program = { put: put.json, programVersion: withProgram.json?.result?.program_version };

console.log(JSON.stringify(out));
