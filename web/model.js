// The conversation as data: logged events (PROTOCOL.md) applied to runs, steps and segments.
// No DOM here. Every object the renderer draws carries a `version` that changes when it
// does, and `apply` records what changed in `dirty`, so a frame re-renders only that.

let nextKey = 1;

function node(kind, fields) {
  return { key: nextKey++, kind, version: 1, ...fields };
}

export class ConversationModel {
  constructor() {
    this.reset();
  }

  /** Forget everything (welcome mode `snapshot`). */
  reset() {
    this.runs = [];
    this.segments = new Map(); // messageId / toolCallId -> segment
    this.toolCalls = new Map(); // toolCallId -> tool segment (results arrive after the step)
    this.totalCostUsd = null;
    this.dirty = new Set();
    this.structureChanged = true; // runs added or removed: the log's children change
    this.lastTimestamp = null;
    this.workspaceChanges = 0; // counts TOOL_CALL_RESULTs and run ends: the page refreshes files
  }

  get currentRun() {
    return this.runs.at(-1) ?? null;
  }

  get running() {
    const run = this.currentRun;
    return run !== null && run.status === "running";
  }

  touch(item) {
    item.version += 1;
    this.dirty.add(item);
  }

  /** Apply one logged event. Unknown types are ignored (forward compatibility). */
  apply(event) {
    if (typeof event.timestamp === "number") this.lastTimestamp = event.timestamp;
    const handler = HANDLERS[event.type];
    if (handler) handler.call(this, event);
  }

  // --- helpers for handlers ---

  run(event) {
    let run = this.currentRun;
    if (run === null || (event.runId && run.runId !== event.runId && run.status !== "running")) {
      run = this.startRun({ runId: event.runId ?? null, userText: null, at: event.timestamp });
    }
    return run;
  }

  startRun({ runId, userText, userName = null, at, status = "running" }) {
    const run = node("run", {
      runId,
      userText,
      userName, // who sent it: untrusted text, shown with textContent only
      startedAt: at ?? null,
      status, // running, success, cancelled, error, done (from a snapshot)
      steps: [],
      error: null,
      gap: null, // {lost, unconfirmed, resumes}: a publisher's stream lost part of this run
      usage: null,
      costUsd: null,
      totalCostUsd: null,
    });
    this.runs.push(run);
    this.structureChanged = true;
    return run;
  }

  step(run) {
    let step = run.steps.at(-1);
    if (!step) {
      step = this.addStep(run, { stepName: null, attempt: 1 });
    }
    return step;
  }

  addStep(run, { stepName, attempt }) {
    const step = node("step", {
      run,
      stepName,
      attempt,
      abandoned: false,
      finishReason: null,
      segments: [],
    });
    run.steps.push(step);
    this.touch(run);
    return step;
  }

  addSegment(run, kind, id, fields) {
    const step = this.step(run);
    const segment = node(kind, { id, step, text: "", open: true, ...fields });
    step.segments.push(segment);
    this.segments.set(id, segment);
    this.touch(step);
    this.dirty.add(segment);
    return segment;
  }

  endOpenSegments(step, at) {
    for (const segment of step.segments) {
      if (segment.open) {
        segment.open = false;
        segment.endedAt = at;
        if (segment.kind === "tool" && segment.status === "args") segment.status = "running";
        this.touch(segment);
      }
    }
  }

  /** Close what is still open; a tool call that never got a result was not run. */
  endRun(run, at) {
    for (const step of run.steps) {
      this.endOpenSegments(step, at);
      for (const segment of step.segments) {
        if (segment.kind === "tool" && segment.status === "running" && segment.result === null) {
          segment.status = "skipped";
          this.touch(segment);
        }
      }
    }
  }

  /** Rebuild from MESSAGES_SNAPSHOT (AG-UI messages): one run per user message. */
  applySnapshot(event) {
    this.reset();
    let run = null;
    let step = null;
    const stepOf = (r) => {
      if (!step) step = this.addStep(r, { stepName: null, attempt: 1 });
      return step;
    };
    for (const message of event.messages ?? []) {
      if (message.role === "user") {
        run = this.startRun({
          runId: null,
          userText: textOf(message.content),
          userName: nameOf(message),
          status: "done",
        });
        step = null;
        continue;
      }
      if (run === null) run = this.startRun({ runId: null, userText: null, status: "done" });
      if (message.role === "reasoning") {
        const s = stepOf(run);
        const segment = node("reasoning", {
          id: message.id,
          step: s,
          text: textOf(message.content),
          open: false,
          startedAt: null,
          endedAt: null,
        });
        s.segments.push(segment);
      } else if (message.role === "assistant") {
        const s = stepOf(run);
        const text = textOf(message.content);
        if (text) {
          s.segments.push(node("text", { id: message.id, step: s, text, open: false }));
        }
        for (const call of message.toolCalls ?? []) {
          const segment = node("tool", {
            id: call.id,
            step: s,
            name: call.function?.name ?? "tool",
            text: call.function?.arguments ?? "",
            open: false,
            status: "running",
            result: null,
            isError: false,
          });
          s.segments.push(segment);
          this.toolCalls.set(call.id, segment);
        }
        step = null; // the next assistant message is the next LLM call
      } else if (message.role === "tool") {
        const segment = this.toolCalls.get(message.toolCallId);
        if (segment) {
          segment.result = textOf(message.content);
          segment.status = "done";
        }
      }
    }
    for (const r of this.runs) this.dirty.add(r);
  }
}

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === "string" ? part : (part?.text ?? ""))).join("");
  }
  return content == null ? "" : String(content);
}

/** A user message's sender (AG-UI's optional `name`), or null. */
function nameOf(message) {
  return typeof message.name === "string" && message.name.trim() ? message.name : null;
}

const HANDLERS = {
  RUN_STARTED(event) {
    const messages = event.input?.messages ?? [];
    const user = messages.findLast?.((m) => m.role === "user") ?? messages.at(-1);
    this.startRun({
      runId: event.runId,
      userText: user ? textOf(user.content) : null,
      userName: user ? nameOf(user) : null,
      at: event.timestamp,
    });
  },

  STEP_STARTED(event) {
    const run = this.run(event);
    const attempt = event.metadata?.attempt ?? 1;
    const previous = run.steps.at(-1);
    const step = this.addStep(run, { stepName: event.stepName ?? null, attempt });
    if (attempt > 1 && previous && previous.stepName === step.stepName && !previous.abandoned) {
      previous.abandoned = true;
      this.touch(previous);
    }
  },

  STEP_FINISHED(event) {
    const run = this.run(event);
    const step = this.step(run);
    this.endOpenSegments(step, event.timestamp);
    step.finishReason = event.metadata?.finishReason ?? null;
    step.usage = event.metadata?.usage ?? null;
    step.costUsd = event.metadata?.costUsd ?? null;
    if (step.finishReason === "retry") step.abandoned = true;
    this.touch(step);
  },

  CUSTOM(event) {
    if (event.name === "stream_gap") {
      const run = this.run(event);
      const value = event.value ?? {};
      const gap = run.gap ?? { lost: 0, unconfirmed: 0, resumes: null };
      gap.lost += Number(value.lost) || 0;
      gap.unconfirmed += Number(value.unconfirmed) || 0;
      gap.resumes = gap.resumes ?? (typeof value.resumes === "string" ? value.resumes : null);
      run.gap = gap;
      this.touch(run);
      return;
    }
    if (event.name !== "step_retry") return;
    const run = this.run(event);
    const step = run.steps.at(-1);
    if (step) {
      step.abandoned = true;
      step.retryReason = event.value?.reason ?? null;
      this.touch(step);
    }
  },

  REASONING_START(event) {
    if (this.segments.has(event.messageId)) return;
    this.addSegment(this.run(event), "reasoning", event.messageId, {
      startedAt: event.timestamp,
      endedAt: null,
    });
  },

  REASONING_MESSAGE_START(event) {
    if (!this.segments.has(event.messageId)) HANDLERS.REASONING_START.call(this, event);
  },

  REASONING_MESSAGE_CONTENT(event) {
    const segment = this.segments.get(event.messageId);
    if (!segment) return;
    segment.text += event.delta;
    this.touch(segment);
  },

  REASONING_MESSAGE_END(event) {
    const segment = this.segments.get(event.messageId);
    if (!segment || !segment.open) return;
    segment.open = false;
    segment.endedAt = event.timestamp;
    this.touch(segment);
  },

  REASONING_END(event) {
    HANDLERS.REASONING_MESSAGE_END.call(this, event);
  },

  TEXT_MESSAGE_START(event) {
    if (this.segments.has(event.messageId)) return;
    this.addSegment(this.run(event), "text", event.messageId, {});
  },

  TEXT_MESSAGE_CONTENT(event) {
    const segment = this.segments.get(event.messageId);
    if (!segment) return;
    segment.text += event.delta;
    this.touch(segment);
  },

  TEXT_MESSAGE_END(event) {
    const segment = this.segments.get(event.messageId);
    if (!segment || !segment.open) return;
    segment.open = false;
    this.touch(segment);
  },

  TOOL_CALL_START(event) {
    if (this.segments.has(event.toolCallId)) return;
    const segment = this.addSegment(this.run(event), "tool", event.toolCallId, {
      name: event.toolCallName,
      status: "args", // args (streaming arguments), running, done, error
      result: null,
      isError: false,
    });
    this.toolCalls.set(event.toolCallId, segment);
  },

  TOOL_CALL_ARGS(event) {
    const segment = this.toolCalls.get(event.toolCallId);
    if (!segment) return;
    segment.text += event.delta;
    this.touch(segment);
  },

  TOOL_CALL_END(event) {
    const segment = this.toolCalls.get(event.toolCallId);
    if (!segment || !segment.open) return;
    segment.open = false;
    if (segment.status === "args") segment.status = "running";
    this.touch(segment);
  },

  TOOL_CALL_RESULT(event) {
    const segment = this.toolCalls.get(event.toolCallId);
    this.workspaceChanges += 1;
    if (!segment) return;
    segment.result = typeof event.content === "string" ? event.content : textOf(event.content);
    segment.isError = Boolean(event.metadata?.isError);
    segment.status = segment.isError ? "error" : "done";
    segment.open = false;
    this.touch(segment);
  },

  RUN_FINISHED(event) {
    const run = this.run(event);
    this.endRun(run, event.timestamp);
    this.workspaceChanges += 1;
    run.status = event.outcome?.type === "cancelled" ? "cancelled" : "success";
    run.usage = event.usage ?? null;
    run.costUsd = event.metadata?.costUsd ?? null;
    run.totalCostUsd = event.metadata?.totalCostUsd ?? null;
    if (run.totalCostUsd != null) this.totalCostUsd = run.totalCostUsd;
    this.touch(run);
  },

  RUN_ERROR(event) {
    const run = this.run(event);
    this.endRun(run, event.timestamp);
    this.workspaceChanges += 1;
    run.status = "error";
    run.error = { message: event.message ?? "The run failed.", code: event.code ?? null };
    this.touch(run);
  },

  MESSAGES_SNAPSHOT(event) {
    this.applySnapshot(event);
  },
};
