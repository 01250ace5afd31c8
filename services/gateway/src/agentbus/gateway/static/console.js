// Live parts of the console: each element with data-stream follows that URL's server-sent events.
"use strict";

function html(text) {
  const template = document.createElement("template");
  template.innerHTML = text.trim();
  return template.content;
}

function followInbox(box) {
  const state = document.getElementById("live-state");
  const resolved = document.getElementById("resolved");
  const stream = new EventSource(box.dataset.stream);
  const showEmpty = () => {
    const empty = box.querySelector("#no-approvals");
    const any = box.querySelector(".approval");
    if (!any && !empty) box.append(html('<p class="empty" id="no-approvals">No approval is waiting.</p>'));
    if (any && empty) empty.remove();
  };
  stream.addEventListener("open", () => { state.textContent = "live"; state.dataset.state = "live"; });
  stream.addEventListener("error", () => { state.textContent = "reconnecting"; state.dataset.state = "reconnecting"; });
  stream.addEventListener("snapshot", (e) => { box.replaceChildren(html(e.data)); showEmpty(); });
  stream.addEventListener("pending", (e) => {
    const card = html(e.data).firstElementChild;
    const existing = document.getElementById(card.id);
    if (existing) { existing.replaceWith(card); } else { card.classList.add("arrived"); box.prepend(card); }
    showEmpty();
  });
  stream.addEventListener("resolved", (e) => {
    const outcome = JSON.parse(e.data);
    const card = document.getElementById("approval-" + outcome.approval_id);
    if (card) card.remove();
    const line = document.createElement("li");
    line.id = "resolved-" + outcome.approval_id;
    line.textContent = outcome.approval_id + " " + outcome.outcome + (outcome.by ? " by " + outcome.by : "") + " (task " + outcome.task_id + ")";
    resolved.prepend(line);
    showEmpty();
  });
}

function followTask(live) {
  const events = document.getElementById("events");
  const text = document.getElementById("live-text");
  const status = document.getElementById("task-status");
  const stream = new EventSource(live.dataset.stream);
  const add = (e) => {
    const item = html(e.data).firstElementChild;
    if (events.querySelector('[data-seq="' + item.dataset.seq + '"]')) return;
    events.append(item);
    text.textContent = "";
    const kind = item.dataset.kind;
    if (kind === "approval_pending") status.textContent = "waiting_for_approval";
    else if (kind !== "token") status.textContent = "running";
    return kind;
  };
  stream.addEventListener("event", add);
  stream.addEventListener("token", (e) => { text.textContent += JSON.parse(e.data); });
  stream.addEventListener("terminal", (e) => {
    status.textContent = add(e) || status.textContent;
    stream.close();
    document.querySelectorAll("form.cancel").forEach((form) => form.remove());
  });
}

function refreshTimes() {
  const now = Date.now();
  const span = (ms) => {
    const s = Math.max(Math.floor(Math.abs(ms) / 1000), 0);
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60); if (m < 60) return m + "m";
    const h = Math.floor(m / 60); if (h < 24) return h + "h" + (m % 60 ? " " + (m % 60) + "m" : "");
    const d = Math.floor(h / 24); return d + "d" + (h % 24 ? " " + (h % 24) + "h" : "");
  };
  document.querySelectorAll(".approval .age").forEach((el) => { el.textContent = span(now - Date.parse(el.dataset.at)) + " ago"; });
  document.querySelectorAll(".approval .expires").forEach((el) => {
    const left = Date.parse(el.dataset.at) - now;
    el.textContent = left > 0 ? "in " + span(left) : span(left) + " ago";
    el.classList.toggle("expired", left <= 0);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const inbox = document.querySelector("#approvals[data-stream]");
  if (inbox) followInbox(inbox);
  const task = document.querySelector("#events-live[data-stream]");
  if (task) followTask(task);
  setInterval(refreshTimes, 15000);
});
