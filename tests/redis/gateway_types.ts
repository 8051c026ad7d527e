// What a TypeScript service writes against the gateway's generated types (openapi-typescript): checked with
// `tsc --strict --noEmit` by tests/redis/test_gateway_clients.py, next to "./gateway" (the generated .d.ts) and
// "./routes" (one assertion per documented operation, written by the test). The gateway it documents serves
// the signatures qa and complex_analysis; every line here must type-check, and each @ts-expect-error must
// still be an error (a type gone loose to `unknown` or `any` would make it pass silently).
import type { components, operations } from "./gateway";

type S = components["schemas"];
type Json<R> = R extends { content: { "application/json": infer B } } ? B : never;
type Ok<O extends keyof operations, C extends keyof operations[O]["responses"]> = Json<operations[O]["responses"][C]>;
type Body<O extends keyof operations> = operations[O] extends { requestBody?: { content: { "application/json": infer B } } }
  ? B
  : never;

// -- a job: typed inputs in (the options are optional), typed outputs and an enum state out --------------------
export const submit: Body<"submit_qa"> = { inputs: { question: "Why is the sky blue?" } };
export const streamed: Body<"run_qa"> = { inputs: { question: "And the sea?" }, stream: true, timeout_s: 30 };
// @ts-expect-error inputs are typed by the signature
export const wrongInput: Body<"submit_qa"> = { inputs: { question: 3 } };

declare const job: Ok<"run_qa", 200>;
export const answer: string | undefined = job.result?.outputs.answer;
export const confidence: number | undefined = job.result?.outputs.confidence;
export const promptTokens: number | undefined = job.result?.usage?.prompt_tokens;
export const cost: number | undefined = job.result?.usage?.cost_usd;
export const traced: string[] | undefined = job.result?.trace?.map((call) => call.predictor);

export function finished(state: S["JobState"]): boolean {
  switch (state) {
    case "SUCCESS":
    case "FAILURE":
    case "REVOKED":
    case "REJECTED":
      return true;
    case "PENDING":
    case "RECEIVED":
    case "STARTED":
    case "PROGRESS":
    case "RETRY":
      return false;
    default: {
      const unknownState: never = state; // every state is listed: the enum is closed
      return unknownState;
    }
  }
}
export const done: boolean = finished(job.state);
// @ts-expect-error a job state is an enum, not any string
export const notAState: S["JobState"] = "RUNNING";

declare const anyJob: Ok<"get_job", 200>;
export const errorFields: string[] = (anyJob.error?.errors ?? []).map((e) => e.field);

// -- an optimization run: one object, a trainset or a dataset; rows typed by the signature's inputs -------------
export const byTrainset: Body<"start_optimization"> = {
  signature: "qa",
  trainset: [{ question: "2 + 2?", answer: "4" }, { question: "Capital of France?", answer: "Paris", source: 7 }],
  params: { max_bootstrapped_demos: 2 },
};
export const byDataset: Body<"start_optimization"> = { signature: "qa", dataset: "qa-gold", optimizer: "miprov2" };
export const row: S["qa.example"] = { question: "q", expected_people: ["Ann"] }; // any other field: a label
// @ts-expect-error the row's inputs are typed
export const badRow: S["qa.example"] = { question: 3 };
// @ts-expect-error a row needs the signature's inputs
export const noInputs: S["qa.example"] = { answer: "4" };
// @ts-expect-error only the published optimizers
export const badOptimizer: Body<"start_optimization"> = { signature: "qa", dataset: "d", optimizer: "sgd" };

declare const run: Ok<"get_optimization", 200>;
export const status: "queued" | "running" | "succeeded" | "failed" | "cancelled" = run.status;
export const stage: S["RunStage"] = run.stage;
export const promoted: boolean | undefined = run.summary?.promoted;
export const spent: number | undefined = run.summary?.usage?.cost_usd;
export const interval: number[] | null | undefined = run.summary?.gain_ci;
export const params: Record<string, unknown> | undefined = run.params;
declare const started: Ok<"start_optimization", 202>;
export const runId: string = started.run_id;
declare const candidate: Ok<"get_optimization_candidate", 200>;
export const candidateState: Record<string, unknown> = candidate.state;

// -- Server-Sent Events: each frame's data is one JSON event, a union told apart by its type -------------------
declare const frameData: string;
const event = JSON.parse(frameData) as S["JobEvent"];
export function describeEvent(e: S["JobEvent"]): string {
  switch (e.type) {
    case "status":
      return e.state; // running | retrying | requeued
    case "step":
      return `${e.phase} ${e.name}`;
    case "tool":
      return e.name;
    case "token":
      return e.chunk;
    case "result":
      return JSON.stringify(e.result.outputs);
    case "error":
      return e.error.message;
    case "state":
      return e.state;
  }
}
export const described: string = describeEvent(event);
const progress = JSON.parse(frameData) as S["RunEvent"];
export const progressStage: S["RunStage"] = progress.stage;
export const progressTotal: number | null | undefined = progress.total;

// -- programs and the registry ---------------------------------------------------------------------------------
export const put: Body<"put_program"> = { state: { demos: [{ question: "q", answer: "a" }] }, signature: "qa" };
declare const registry: Ok<"list_signatures", 200>;
export const inputTypes: Record<string, string> | undefined = registry.signatures["qa"]?.input_fields;
declare const history: Ok<"program_history", 200>;
export const versions: number[] = history.versions;
declare const problem: S["Problem"];
export const problemFields: (string | undefined)[] = (problem.errors ?? []).map((e) => e.pointer);
