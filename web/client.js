// costream protocol client (PROTOCOL.md, subprotocol costream.v1), reusable outside the page.
//
//   const client = new CostreamClient({ conversationId, token, onEvent, onReset, onWelcome,
//                                       onControl, onState });
//   client.connect(); client.send("hi"); client.cancel(); client.close();
//
// Guarantees to its user: onEvent sees logged events in seq order with no gap and no
// duplicate. On a jump it reconnects with `hello.lastSeq`; on `welcome` mode `snapshot`
// it calls onReset() before the MESSAGES_SNAPSHOT event, which the user rebuilds from.
// onCaughtUp() says the history is all there (seq reached the head seen at connect time):
// draw it at once, then follow live.
//
// A client far behind (a late joiner of a long conversation) first reads the log over
// HTTP (`GET .../events`, one response per 10 000 events), then says `hello` from there:
// a browser takes a task per WebSocket message, which for a 10 000-event replay is about
// a second of delivery on its own; one HTTP body takes a few tens of milliseconds.

export const SUBPROTOCOL = "costream.v1";

// What to do on each close code (PROTOCOL.md, "Close codes").
const STOP_CODES = new Map([
  [1000, "closed"],
  [1009, "a frame was too big"],
  [4400, "the client sent a bad frame"],
  [4401, "missing or wrong token"],
  [4403, "origin not allowed"],
  [4404, "unknown conversation"],
]);
const OVERLOADED = 1013;
// Our own close code when we drop the socket to resume (a seq jump, a silent server).
const CLOSE_RESUME = 4001;

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15_000;
const OVERLOADED_MIN_MS = 5_000;
// The server sends a heartbeat at least every 20 s; silence beyond this means a dead link.
const SILENCE_MS = 45_000;
// Read the log over HTTP first when at least this many events behind.
const PREFETCH_MIN_EVENTS = 256;
const PREFETCH_PAGE = 10_000;
const PING_EVERY_MS = 25_000;

/** Full-jitter exponential backoff: a random delay in [base/2, min(max, base * 2^n)]. */
export function backoffDelay(attempt, { base = BACKOFF_BASE_MS, max = BACKOFF_MAX_MS } = {}) {
  const ceiling = Math.min(max, base * 2 ** attempt);
  return base / 2 + Math.random() * Math.max(0, ceiling - base / 2);
}

export class CostreamClient {
  constructor({
    conversationId,
    token,
    url = null,
    onEvent = () => {},
    onReset = () => {},
    onWelcome = () => {},
    onControl = () => {},
    onState = () => {},
    onCaughtUp = () => {},
    apiBase = null,
    name = null,
  }) {
    this.conversationId = conversationId;
    this.token = token;
    this.name = name; // the display name sent in hello; null: unnamed
    this.url = url ?? CostreamClient.defaultUrl(conversationId);
    this.handlers = { onEvent, onReset, onWelcome, onControl, onState, onCaughtUp };
    this.apiBase = apiBase ?? `/api/conversations/${encodeURIComponent(conversationId)}`;
    this.caughtUp = false;
    this.lastSeq = 0;
    this.epoch = null;
    this.head = 0; // the log's head when the current connection was welcomed
    this.role = null;
    this.welcomes = 0; // connections that got as far as `welcome`
    this.mode = null; // the last welcome's: replay or snapshot
    this.state = "idle"; // connecting, live, reconnecting, offline (stopped)
    this.stopReason = null;
    this.stopCode = null; // the close code that stopped the client for good
    this.socket = null;
    this.attempt = 0;
    this.retryTimer = null;
    this.silenceTimer = null;
    this.pingTimer = null;
    this.stopped = false;
    this.onOnline = () => this.state === "reconnecting" && this.#reconnectNow();
    addEventListener("online", this.onOnline);
  }

  static defaultUrl(conversationId) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws/conversations/${encodeURIComponent(conversationId)}`;
  }

  /** Open the connection; it resumes on its own until close() or a terminal close code. */
  connect() {
    this.stopped = false;
    this.#open();
  }

  /** Stop for good (close code 1000). */
  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.#clearTimers();
    removeEventListener("online", this.onOnline);
    if (this.socket) this.socket.close(1000, "bye");
    this.#setState("offline", "closed");
  }

  /** Go by another name: the connection resumes at once with it (others see the change). */
  setName(name) {
    this.name = name;
    if (this.socket) this.socket.close(CLOSE_RESUME, "new name");
  }

  /** Start a run (writer only). False when not connected. */
  send(content) {
    return this.#sendFrame({ type: "message", content });
  }

  /** Cancel the running run (writer only). */
  cancel() {
    return this.#sendFrame({ type: "cancel" });
  }

  /** Drop the socket as a network failure would; the client resumes from lastSeq. */
  dropConnection() {
    if (this.socket) this.socket.close(CLOSE_RESUME, "test: dropped");
  }

  #sendFrame(frame) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN || this.state !== "live") {
      return false;
    }
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  #setState(state, reason = null) {
    if (this.state === state && this.stopReason === reason) return;
    this.state = state;
    this.stopReason = reason;
    this.handlers.onState(state, reason);
  }

  async #open() {
    clearTimeout(this.retryTimer);
    this.#setState(this.attempt === 0 && this.lastSeq === 0 ? "connecting" : "reconnecting");
    await this.#prefetch();
    if (this.stopped) return;
    const socket = new WebSocket(this.url, SUBPROTOCOL);
    this.socket = socket;
    socket.onopen = () => {
      socket.send(
        JSON.stringify({
          type: "hello",
          conversationId: this.conversationId,
          token: this.token,
          lastSeq: this.lastSeq,
          epoch: this.epoch,
          ...(this.name ? { name: this.name } : {}),
        }),
      );
      this.#armSilence();
    };
    socket.onmessage = (message) => {
      if (socket !== this.socket) return;
      this.#armSilence();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return; // the server only sends JSON; ignore anything else
      }
      this.#onFrame(frame);
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.#clearTimers();
      this.#onClose(event.code, event.reason);
    };
  }

  /** Read the log over HTTP up to its head when far behind. Failures are left to the socket. */
  async #prefetch() {
    try {
      const headers = { Authorization: `Bearer ${this.token}` };
      const answer = await fetch(this.apiBase, { headers });
      if (!answer.ok) return;
      const info = await answer.json();
      if (this.epoch !== null && info.epoch !== this.epoch) return; // the socket says snapshot
      if (info.head - this.lastSeq < PREFETCH_MIN_EVENTS) return;
      this.epoch = info.epoch;
      this.head = Math.max(this.head, info.head);
      while (this.lastSeq < info.head && !this.stopped) {
        const url = `${this.apiBase}/events?after=${this.lastSeq}&limit=${PREFETCH_PAGE}`;
        const page = await fetch(url, { headers });
        if (!page.ok) return;
        const events = await page.json();
        // Trimmed (the first is not the next one) or empty: the socket's resume decides.
        if (events.length === 0 || events[0].seq !== this.lastSeq + 1) return;
        for (const event of events) {
          if (event.seq !== this.lastSeq + 1) return;
          this.lastSeq = event.seq;
          this.handlers.onEvent(event);
        }
        this.#checkCaughtUp();
      }
    } catch {
      // network trouble: the socket's own retries handle it
    }
  }

  #checkCaughtUp() {
    if (!this.caughtUp && this.lastSeq >= this.head) {
      this.caughtUp = true;
      this.handlers.onCaughtUp();
    }
  }

  #onFrame(frame) {
    if (typeof frame.seq === "number") {
      this.#onLogged(frame);
      return;
    }
    if (frame.type === "welcome") {
      this.attempt = 0;
      this.welcomes += 1;
      this.mode = frame.mode;
      this.epoch = frame.epoch;
      this.head = frame.head;
      this.role = frame.role;
      if (frame.mode === "snapshot") {
        // What we had is no longer comparable: drop it and rebuild from what follows.
        this.lastSeq = 0;
        this.caughtUp = false;
        this.handlers.onReset(frame);
      }
      this.handlers.onWelcome(frame);
      this.#setState("live");
      this.#checkCaughtUp();
      return;
    }
    this.handlers.onControl(frame);
  }

  #onLogged(event) {
    if (event.type === "MESSAGES_SNAPSHOT") {
      this.lastSeq = event.seq;
      this.handlers.onEvent(event);
      this.#checkCaughtUp();
      return;
    }
    if (event.seq <= this.lastSeq) return; // already applied (cannot happen per protocol)
    if (event.seq !== this.lastSeq + 1) {
      // A gap: never apply out of order. Resume from what we have.
      this.socket?.close(CLOSE_RESUME, "seq gap, resuming");
      return;
    }
    this.lastSeq = event.seq;
    this.handlers.onEvent(event);
    this.#checkCaughtUp();
  }

  #onClose(code, reason) {
    if (this.stopped) return;
    const stop = STOP_CODES.get(code);
    if (stop !== undefined) {
      this.stopped = true;
      this.stopCode = code;
      this.#setState("offline", reason || stop);
      return;
    }
    let delay = backoffDelay(this.attempt);
    if (code === OVERLOADED) delay = Math.max(delay, OVERLOADED_MIN_MS);
    if (code === CLOSE_RESUME) delay = Math.min(delay, 250); // our own choice: resume at once
    this.attempt += 1;
    this.#setState("reconnecting", reason || `connection lost (${code})`);
    this.retryTimer = setTimeout(() => this.#open(), delay);
  }

  #reconnectNow() {
    if (this.socket !== null || this.stopped) return; // already on its way
    clearTimeout(this.retryTimer);
    this.#open();
  }

  #armSilence() {
    clearTimeout(this.silenceTimer);
    this.silenceTimer = setTimeout(() => this.socket?.close(CLOSE_RESUME, "silent"), SILENCE_MS);
    if (!this.pingTimer) {
      this.pingTimer = setInterval(() => this.#sendFrame({ type: "ping" }), PING_EVERY_MS);
    }
  }

  #clearTimers() {
    clearTimeout(this.silenceTimer);
    clearInterval(this.pingTimer);
    this.silenceTimer = null;
    this.pingTimer = null;
  }
}
