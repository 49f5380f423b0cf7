// Chat: a streaming conversation with any served model over /v1/chat/completions, with time to
// first token and decode speed measured in the browser from the stream itself.

import { api, askForKey, authHeaders, fill, h } from "../util.js";

let picker, log, input, temperature, maxTokens, sendButton, stopButton, servedKey = "";
let history = [];
let running = null; // the AbortController of the answer streaming now

export function mount(el) {
  picker = h("select", { id: "chat-model" });
  log = h("div", { class: "log", id: "chat-log" }, h("div", { class: "empty" }, "Ask something."));
  input = h("textarea", { id: "chat-input", placeholder: "Message (Enter sends, Shift+Enter for a new line)",
    onkeydown: (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } } });
  temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1,
    value: 0.7, style: "width:5em" });
  maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, step: 1, value: 256,
    style: "width:6em" });
  sendButton = h("button", { class: "primary", id: "chat-send", onclick: () => send() }, "Send");
  stopButton = h("button", { id: "chat-stop", disabled: true, onclick: () => running?.abort() }, "Stop");
  fill(el, h("div", { class: "chat" },
    h("div", { class: "toolbar" }, h("label", { for: "chat-model" }, "Model"), picker,
      h("button", { onclick: () => { history = []; fill(log); } }, "New chat")),
    log, input, h("div", { class: "toolbar" }, sendButton, stopButton,
      h("label", { for: "chat-temperature", style: "margin-left:auto" }, "temperature"), temperature,
      h("label", { for: "chat-max-tokens" }, "max tokens"), maxTokens)));
}

export async function update(state) {
  // served models change rarely: refresh the list when the placed instances change
  const key = Object.keys(state.instances || {}).sort().join(",");
  if (key === servedKey && picker.options.length) return;
  servedKey = key;
  try {
    const doc = await api("/v1/models");
    const chosen = picker.value;
    const ids = doc.data.map((m) => m.id);
    fill(picker, ids.length ? ids.map((id) => h("option", { value: id, selected: id === chosen }, id))
      : h("option", { value: "" }, "no model is served"));
  } catch {
    servedKey = ""; // try again on the next poll
  }
}

function turn(role, text) {
  const textEl = h("div", { class: "text" }, text);
  const stats = h("div", { class: "stats" });
  const el = h("div", { class: `turn ${role}` }, h("div", { class: "who" }, role), textEl, stats);
  if (log.querySelector(".empty")) fill(log);
  log.append(el);
  log.scrollTop = log.scrollHeight;
  return { textEl, stats, el };
}

async function send() {
  const text = input.value.trim();
  const model = picker.value;
  if (!text || !model || running) return;
  input.value = "";
  history.push({ role: "user", content: text });
  turn("user", text);
  const answer = turn("assistant", "");
  answer.el.classList.add("streaming");
  running = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  const started = performance.now();
  let first = null, last = null, chunks = 0, usage = null, content = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      signal: running.signal,
      body: JSON.stringify({ model, messages: history, stream: true,
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
        stream_options: { include_usage: true } }),
    });
    if (!response.ok) {
      if (response.status === 401) askForKey();
      const doc = await response.json().catch(() => null);
      throw new Error(`${response.status}: ${doc?.error?.message || response.statusText}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            const now = performance.now();
            first ??= now;
            last = now;
            chunks += 1;
            content += delta;
            answer.textEl.textContent = content;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
      if (first !== null) answer.stats.textContent = stats(started, first, last, chunks, usage);
    }
    history.push({ role: "assistant", content });
    answer.stats.textContent = stats(started, first, last, chunks, usage);
  } catch (error) {
    const stopped = error.name === "AbortError";
    answer.stats.textContent = stopped ? "stopped" : "";
    if (!stopped) answer.el.append(h("div", { class: "message error" }, error.message));
    if (content) history.push({ role: "assistant", content });
    else history.pop(); // the question got no answer: leave it out of the next request
  } finally {
    answer.el.classList.remove("streaming");
    answer.el.classList.add("done");
    running = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
  }
}

/** TTFT from the request; decode speed over the tokens after the first. */
function stats(started, first, last, chunks, usage) {
  if (first === null) return "no tokens";
  const tokens = usage?.completion_tokens ?? chunks;
  const ttft = first - started;
  const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null;
  return `TTFT ${ttft.toFixed(0)} ms · ${rate === null ? "–" : rate.toFixed(1)} tok/s · ${tokens} tokens`;
}
