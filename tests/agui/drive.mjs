// Drives the official AG-UI client (@ag-ui/client HttpAgent) against a costream server,
// for tests/test_agui.py. Usage:
//   node drive.mjs shared <server url> <conversation id> <write token> <view token> <prompt> <prompt>
//   node drive.mjs run <server url> <conversation id> <write token> <prompt>
//   node drive.mjs watch <server url> <conversation id> <view token>
// "run": one runAgent() of one prompt. "watch": one connectAgent(), which resolves once no
// run is under way. "shared": a writer runs both prompts through POST .../agui; a viewer attached with the view token
// before the second run follows it live (POST .../agui/connect, forwardedProps.follow);
// a late joiner connects once both runs ended. Every event a client receives is checked
// with @ag-ui/core's zod schemas. Prints one JSON object: each client's messages and raw
// events, and every warning or error the client library printed (there should be none).
import { randomUUID } from "node:crypto";
import { HttpAgent, runHttpRequest, transformHttpEventStream } from "@ag-ui/client";
import { EventSchema } from "@ag-ui/core/schemas";
import { tap } from "rxjs";

const printed = [];
for (const level of ["warn", "error", "info", "log", "debug"]) {
  console[level] = (...args) => printed.push(`${level}: ${args.map(String).join(" ")}`);
}
process.on("warning", (warning) => printed.push(`process: ${warning}`));

const invalid = [];
function check(events) {
  return tap((event) => {
    const parsed = EventSchema.safeParse(event);
    if (!parsed.success) invalid.push({ event, issues: parsed.error.issues });
    events.push(event);
  });
}

/** HttpAgent, keeping the events as they came off the wire. */
class RecordingAgent extends HttpAgent {
  events = [];
  run(input) {
    return super.run(input).pipe(check(this.events));
  }
}

/** HttpAgent does not implement connect(): this is costream's, one POST like run(). */
class CostreamAgent extends RecordingAgent {
  connect(input) {
    const events = runHttpRequest(() => this.fetch(`${this.url}/connect`, this.requestInit(input)));
    return transformHttpEventStream(events, this.debugLogger).pipe(check(this.events));
  }
}

const [mode, base, threadId, writeToken, ...rest] = process.argv.slice(2);
const url = `${base}/api/conversations/${threadId}/agui`;
const agent = (Kind, token) =>
  new Kind({ url, threadId, headers: { Authorization: `Bearer ${token}` } });

const writer = agent(RecordingAgent, writeToken);
const runIds = [];
async function say(content) {
  const runId = randomUUID();
  runIds.push(runId);
  writer.addMessage({ id: randomUUID(), role: "user", content });
  await writer.runAgent({ runId });
}

if (mode === "run") {
  await say(rest[0]);
  const writerResult = { messages: writer.messages, events: writer.events };
  process.stdout.write(JSON.stringify({ runIds, writer: writerResult, invalid, printed }));
  process.exit(0);
}

if (mode === "watch") {
  const watcher = agent(CostreamAgent, writeToken);
  await watcher.connectAgent();
  const watcherResult = { messages: watcher.messages, events: watcher.events };
  process.stdout.write(JSON.stringify({ watcher: watcherResult, invalid, printed }));
  process.exit(0);
}

const [viewToken, ...prompts] = rest;
await say(prompts[0]);

const viewer = agent(CostreamAgent, viewToken);
let caughtUp, sawSecondRun;
const caughtUpPromise = new Promise((resolve) => (caughtUp = resolve));
const sawSecondRunPromise = new Promise((resolve) => (sawSecondRun = resolve));
const watching = viewer.connectAgent(
  { forwardedProps: { follow: true } },
  {
    onRunFinishedEvent: ({ event }) => {
      if (event.runId.startsWith("snapshot-")) caughtUp();
      if (event.runId === runIds[1]) sawSecondRun();
    },
  },
);
await caughtUpPromise;
await say(prompts[1]);
await sawSecondRunPromise;
await viewer.detachActiveRun();
viewer.abortRun();
await watching;

const late = agent(CostreamAgent, viewToken);
await late.connectAgent();

process.stdout.write(
  JSON.stringify({
    runIds,
    writer: { messages: writer.messages, events: writer.events },
    viewer: { messages: viewer.messages, events: viewer.events },
    late: { messages: late.messages, events: late.events },
    invalid,
    printed,
  }),
);
