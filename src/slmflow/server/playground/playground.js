// The slmflow playground: a chat through the server's own /v1/chat/completions, streamed.
// No dependencies and no CDN: everything it needs is this file. Model output is rendered as
// Markdown by escaping all of it first and only then adding a few tags, so it can never inject HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, key: sessionStorage.getItem("slmflow-api-key") || "" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Markdown, safely: the text is escaped as a whole, then code blocks, inline code, bold, italics,
// links (http and https only) and paragraphs become tags. Nothing the model writes is ever HTML.
function renderMarkdown(text) {
  const blocks = [];
  let html = escapeHtml(text).replace(/```[^\n]*\n?([\s\S]*?)(```|$)/g, (_, code) => {
    blocks.push(`<pre><code>${code}</code></pre>`);
    return `\u0000${blocks.length - 1}\u0000`;
  });
  html = html
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
  html = html
    .split(/\n{2,}/)
    .map((para) => (/^\u0000\d+\u0000$/.test(para.trim()) ? para : `<p>${para.replace(/\n/g, "<br>")}</p>`))
    .join("");
  return html.replace(/\u0000(\d+)\u0000/g, (_, i) => blocks[Number(i)]);
}

function headers() {
  const h = { "content-type": "application/json" };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

// With an API key set on the server, every API call needs it: ask once, keep it for the tab.
async function authorized(url, options) {
  for (;;) {
    const response = await fetch(url, { ...options, headers: headers() });
    if (response.status !== 401) return response;
    const key = window.prompt("This server needs an API key:");
    if (!key) return response;
    state.key = key;
    sessionStorage.setItem("slmflow-api-key", key);
  }
}

async function showModel() {
  const response = await authorized("/v1/models", { method: "GET" });
  if (!response.ok) return;
  const model = (await response.json()).data[0];
  const version = model.version ? ` · version ${model.version}` : "";
  $("model").textContent = `${model.id}${version}${model.model_uri ? ` · ${model.model_uri}` : ""}`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  if (role === "user") div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function requestBody() {
  const body = {
    model: "playground",
    messages: [...($("system").value.trim() ? [{ role: "system", content: $("system").value }] : []), ...state.history],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const extra = $("extra").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra));
  return body;
}

async function send(text) {
  $("status").textContent = "";
  let body;
  state.history.push({ role: "user", content: text });
  try {
    body = requestBody();
  } catch (e) {
    state.history.pop();
    $("status").textContent = `More parameters: not valid JSON (${e.message})`;
    return;
  }
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.setAttribute("data-state", "streaming");
  const content = document.createElement("div");
  content.className = "content";
  const stats = document.createElement("div");
  stats.className = "stats";
  answer.append(content, stats);
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let text_ = "", firstToken = null, usage = null, finish = null;
  try {
    const response = await authorized("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error ? error.error.message : response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          if (firstToken === null) firstToken = performance.now();
          text_ += choice.delta.content;
          content.innerHTML = renderMarkdown(text_);
          answer.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    answer.setAttribute("data-state", "done");
  } catch (e) {
    if (e.name === "AbortError") {
      answer.setAttribute("data-state", "stopped");
      finish = "stopped";
    } else {
      answer.classList.add("error");
      answer.setAttribute("data-state", "error");
      content.textContent = e.message;
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  state.history.push({ role: "assistant", content: text_ });
  const seconds = (performance.now() - started) / 1000;
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (firstToken !== null) parts.push(`first token ${((firstToken - started) / 1000).toFixed(2)} s`);
  if (usage && firstToken !== null && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
  if (finish) parts.push(finish === "stopped" ? "stopped" : `finish: ${finish}`);
  stats.textContent = parts.join(" · ");
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
// Stopping aborts the request: the server sees the client leave and cancels the generation.
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.history = [];
  $("conversation").replaceChildren();
});
$("temperature").addEventListener("input", () => ($("temperature-value").textContent = $("temperature").value));
showModel();
