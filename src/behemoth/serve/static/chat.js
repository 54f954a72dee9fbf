// The chat page: plain JavaScript, no build step, talks only to this server's /v1 API.
// The API key and the conversation live in sessionStorage (this tab only); text is always put
// into the page with textContent, never as HTML.
"use strict";

const KEY_ITEM = "behemoth.apiKey";
const CHAT_ITEM = "behemoth.conversation";
const MODEL_ITEM = "behemoth.model";

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const modelSelect = $("model");
const status = $("status");

let messages = [];          // the conversation sent with each request: [{role, content}]
let controller = null;      // AbortController of the reply being streamed

// -- the API key ---------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

function askForKey(error) {
  $("key-error").textContent = error || "";
  $("key-overlay").hidden = false;
  $("key-input").value = "";
  $("key-input").focus();
}

async function submitKey() {
  const key = $("key-input").value.trim();
  if (!key) {
    $("key-error").textContent = "Paste a key first.";
    return;
  }
  sessionStorage.setItem(KEY_ITEM, key);
  $("key-overlay").hidden = true;
  await loadModels();
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return new ApiError(response.status, (body.error && body.error.message) || response.statusText);
  } catch (e) {
    return new ApiError(response.status, response.statusText || "request failed");
  }
}

async function api(path, options) {
  const response = await fetch(path, {
    ...options,
    headers: {"Authorization": "Bearer " + apiKey(), "Content-Type": "application/json"},
  });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY_ITEM);
      askForKey(error.message);
    }
    throw error;
  }
  return response;
}

// -- models --------------------------------------------------------------------------------------

async function loadModels() {
  let data;
  try {
    data = await (await api("/v1/models")).json();
  } catch (e) {
    setStatus("Could not list models: " + e.message);
    return;
  }
  const wanted = sessionStorage.getItem(MODEL_ITEM);
  modelSelect.replaceChildren();
  for (const model of data.data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    option.selected = model.id === wanted;
    modelSelect.append(option);
  }
  setStatus(data.data.length ? "Ready." : "This key may use no model.");
  input.focus();
}

// -- the conversation ----------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function saveConversation() {
  sessionStorage.setItem(CHAT_ITEM, JSON.stringify(messages));
}

function restoreConversation() {
  try {
    messages = JSON.parse(sessionStorage.getItem(CHAT_ITEM) || "[]");
  } catch (e) {
    messages = [];
  }
  for (const message of messages) addMessage(message.role, message.content);
}

function newChat() {
  if (controller) controller.abort();
  messages = [];
  saveConversation();
  log.replaceChildren();
  setStatus("New chat.");
  input.focus();
}

function setStatus(text) {
  status.textContent = text;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  input.disabled = busy;
}

function numberFrom(element, fallback) {
  const value = Number(element.value);
  return element.value !== "" && Number.isFinite(value) ? value : fallback;
}

// Reads an SSE stream: calls onEvent(parsed JSON) for each `data:` line until `[DONE]`.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = input.value.trim();
  if (!text || controller) return;
  if (!apiKey()) return askForKey();
  if (!modelSelect.value) return setStatus("No model to talk to.");
  sessionStorage.setItem(MODEL_ITEM, modelSelect.value);
  messages.push({role: "user", content: text});
  saveConversation();
  addMessage("user", text);
  input.value = "";

  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  bubble.dataset.chunks = "0";
  let reply = "";
  let usage = null;
  let finish = null;
  controller = new AbortController();
  setBusy(true);
  setStatus("Thinking...");
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      body: JSON.stringify({
        model: modelSelect.value,
        messages: messages,
        temperature: numberFrom($("temperature"), 0.7),
        max_tokens: Math.round(numberFrom($("max-tokens"), 256)),
        stream: true,
        stream_options: {include_usage: true},
      }),
    });
    await readEvents(response, (event) => {
      if (event.error) throw new ApiError(500, event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        reply += delta;
        bubble.textContent = reply;
        bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        log.scrollTop = log.scrollHeight;
        setStatus("Streaming...");
      }
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = usage ? usage.completion_tokens + " tokens, " : "";
    setStatus("Done: " + tokens + seconds + " s" + (finish === "length" ? " (stopped at max tokens)" : "") + ".");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("Stopped.");
    } else {
      addMessage("error", e.message);
      setStatus("Error.");
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    if (reply) {
      messages.push({role: "assistant", content: reply});
    } else {
      bubble.remove();
    }
    saveConversation();
    controller = null;
    setBusy(false);
    input.focus();
  }
}

// -- wiring --------------------------------------------------------------------------------------

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", newChat);
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  askForKey("Key removed from this tab.");
});
$("key-submit").addEventListener("click", submitKey);
$("key-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter") submitKey();
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    send();
  }
});

restoreConversation();
if (apiKey()) {
  loadModels();
} else {
  askForKey();
}
