// The job list: kept in localStorage so that a reload or a browser restart finds every job again; each
// unfinished job follows its event stream (resuming with Last-Event-ID) and falls back to polling with
// back-off when the stream fails. Finished jobs show their takes with a player.

import { ApiError, api, audioBlob, streamEvents } from "./api.js";
import { formatTime } from "./lyrics.js";
import { attachLivePlayer, attachPlayer } from "./player.js";

const STORE = "musicgen.jobs";
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function isFinal(status) {
  return FINAL.has(status);
}

// A request that makes this job again, from the parameters the server kept.
export function requestFromParameters(p) {
  const body = {
    lyrics: p.lrc || "", model: p.model, duration_s: p.duration_s, num_takes: p.num_takes,
    steps: p.steps, cfg_strength: p.cfg_strength, output_format: p.output_format, seed: p.seed,
  };
  if (p.reference_audio_id) body.reference_audio_id = p.reference_audio_id;
  else body.style_prompt = p.style_prompt;
  return body;
}

function titleOf(entry) {
  const p = (entry.view && entry.view.parameters) || entry.request || {};
  const lyric = (p.lrc || p.lyrics || "").split("\n").map((l) => l.replace(/\[[^\]]*\]/g, "").trim()).find(Boolean);
  const what = lyric || (p.style_prompt ? `${p.style_prompt} (instrumental)` : "Instrumental");
  return what.length > 60 ? what.slice(0, 57) + "…" : what;
}

function progressText(v) {
  if (v.status === "queued") {
    const pos = v.queue_position != null ? `position ${v.queue_position + 1} in the queue` : "waiting for a generator";
    return `Queued: ${pos}${v.eta_s != null ? `, starts in about ${Math.ceil(v.eta_s)} s` : ""}`;
  }
  if (v.status === "running") {
    const stage = (v.stage || "starting").replace(/_/g, " ");
    const step = v.total_steps ? `, step ${v.step || 0} of ${v.total_steps}` : "";
    const eta = v.eta_s != null ? `, about ${Math.ceil(v.eta_s)} s left` : "";
    return `${stage[0].toUpperCase()}${stage.slice(1)}${step}${eta}${v.cancel_requested ? " (canceling)" : ""}`;
  }
  return { succeeded: "Done", failed: "Failed", canceled: "Canceled" }[v.status] || v.status;
}

export class JobList {
  constructor(list, empty, hooks) {
    this.list = list;
    this.empty = empty;
    this.hooks = hooks; // {announce(text), notice(text), again(entry, take), regenerate(entry, take, start, end), retry(entry)}
    this.entries = new Map();
    this.jobTemplate = document.getElementById("job-template");
    this.takeTemplate = document.getElementById("take-template");
  }

  load() {
    let saved = [];
    try {
      saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    } catch {
      saved = [];
    }
    for (const e of saved) this.entries.set(e.id, { ...e, following: false, rendered: null });
    for (const entry of this.sorted()) this.render(entry);
    for (const entry of this.entries.values()) if (!isFinal(entry.view.status)) this.follow(entry);
    this.updateEmpty();
  }

  save() {
    const keep = [...this.entries.values()].map(({ id, view, request, lastEventId, created }) => ({
      id, view, request, lastEventId, created,
    }));
    localStorage.setItem(STORE, JSON.stringify(keep));
  }

  sorted() {
    return [...this.entries.values()].sort((a, b) => (b.view.created_at || 0) - (a.view.created_at || 0));
  }

  updateEmpty() {
    this.empty.hidden = this.entries.size > 0;
  }

  add(view, request) {
    const entry = { id: view.id, view, request, lastEventId: null, created: Date.now(), following: false };
    this.entries.set(view.id, entry);
    this.save();
    this.render(entry);
    this.updateEmpty();
    if (!isFinal(view.status)) this.follow(entry);
    return entry;
  }

  // Jobs made with the same key elsewhere (another browser or device): added, and followed.
  merge(views) {
    for (const view of views) if (!this.entries.has(view.id)) this.add(view, null);
  }

  setView(entry, view) {
    const before = entry.view;
    entry.view = view;
    this.save();
    this.render(entry);
    if (before.status !== view.status || before.stage !== view.stage) {
      const why = view.status === "failed" && view.error ? `: ${view.error.message}` : "";
      this.hooks.announce(`“${titleOf(entry)}”: ${progressText(view)}${why}`);
    }
  }

  async follow(entry) {
    if (entry.following) return;
    entry.following = true;
    let failures = 0;
    try {
      while (!isFinal(entry.view.status)) {
        try {
          const end = await streamEvents(entry.id, entry.lastEventId, (ev) => {
            const view = ev.event === "progress" ? { ...entry.view, ...ev.data } : ev.data;
            entry.lastEventId = ev.id;
            this.setView(entry, view);
            return isFinal(view.status);
          });
          failures = 0;
          if (end === "final" && !isFinal(entry.view.status)) this.setView(entry, await api.song(entry.id));
          else if (end === "closed") await sleep(1000);
        } catch (err) {
          if (err instanceof ApiError && err.status === 404) {
            entry.view = { ...entry.view, status: "canceled", error: { message: "this job is no longer on the server", recovery: "remove it from the list" } };
            this.render(entry);
            return;
          }
          if (err instanceof ApiError && err.status === 401) this.hooks.notice(`${err.message}. ${err.recovery}`);
          failures += 1;
          // the stream failed: poll instead, backing off (1 s, 2 s, 4 s ... 30 s), then try it again
          await sleep(Math.min(30000, 1000 * 2 ** Math.min(failures - 1, 5)));
          try {
            this.setView(entry, await api.song(entry.id));
          } catch {
            // still unreachable: the next round backs off further
          }
        }
      }
    } finally {
      entry.following = false;
    }
  }

  remove(entry) {
    this.entries.delete(entry.id);
    if (entry.rendered) entry.rendered.li.remove();
    this.save();
    this.updateEmpty();
  }

  render(entry) {
    let r = entry.rendered;
    if (!r) {
      const li = this.jobTemplate.content.firstElementChild.cloneNode(true);
      r = entry.rendered = {
        li, title: li.querySelector(".job-title"), status: li.querySelector(".status"),
        meta: li.querySelector(".job-meta"), bar: li.querySelector("progress"),
        text: li.querySelector(".progress-text"), error: li.querySelector(".job-error"),
        cancel: li.querySelector(".cancel"), retry: li.querySelector(".retry"),
        forget: li.querySelector(".forget"), takes: li.querySelector(".takes"), takesShown: false,
      };
      li.dataset.id = entry.id;
      r.title.id = `job-${entry.id}`;
      li.querySelector("article").setAttribute("aria-labelledby", r.title.id);
      r.cancel.addEventListener("click", async () => {
        r.cancel.disabled = true;
        try {
          this.setView(entry, await api.cancel(entry.id));
        } catch (err) {
          this.hooks.notice(`${err.message}. ${err.recovery || ""}`);
        } finally {
          r.cancel.disabled = false;
        }
      });
      r.retry.addEventListener("click", () => this.hooks.retry(entry));
      r.forget.addEventListener("click", () => this.remove(entry));
      const after = this.sorted().find((e) => e !== entry && e.rendered && (e.view.created_at || 0) < (entry.view.created_at || 0));
      this.list.insertBefore(li, after ? after.rendered.li : null);
    }
    const v = entry.view;
    const p = v.parameters || {};
    r.li.dataset.status = v.status;
    r.title.textContent = titleOf(entry);
    r.status.textContent = v.status;
    r.status.className = `status status-${v.status}`;
    const edit = p.edit_segments ? ` · regenerates ${p.edit_segments.map((s) => `${s[0]}–${s[1]} s`).join(", ")}` : "";
    r.meta.textContent = `${p.model || ""} · ${p.duration_s != null ? formatTime(p.duration_s) : ""} · ${p.num_takes || 1} take(s) · ${new Date((v.created_at || 0) * 1000).toLocaleString()}${edit}`;
    const running = !isFinal(v.status);
    r.bar.hidden = !running;
    r.bar.value = v.status === "running" ? v.progress || 0 : 0;
    if (v.status === "queued") r.bar.removeAttribute("value"); // indeterminate while queued
    r.bar.setAttribute("aria-label", `Progress of “${titleOf(entry)}”`);
    r.text.textContent = progressText(v);
    r.cancel.hidden = !running;
    r.retry.hidden = running || v.status === "succeeded";
    if (v.error) {
      r.error.hidden = false;
      r.error.replaceChildren();
      const msg = document.createElement("p");
      msg.textContent = `${v.error.code ? v.error.code + ": " : ""}${v.error.message}`;
      const hint = document.createElement("p");
      hint.className = "recovery";
      hint.textContent = v.error.recovery ? `Hint: ${v.error.recovery}` : "";
      r.error.append(msg, hint);
    } else r.error.hidden = true;
    if (v.status === "running" && !r.live && !r.takesShown && v.links && v.links.live && this.hooks.liveAudio(p.model)) {
      this.renderLive(entry, v.links.live);
    }
    if (v.status === "succeeded" && !r.takesShown) {
      r.takesShown = true;
      for (const take of v.takes || []) this.renderTake(entry, take);
    } else if (isFinal(v.status) && v.status !== "succeeded" && r.live) {
      r.live.root.remove(); // failed or canceled: nothing more will come
      r.live = null;
    }
  }

  // Take 1 while it is written (models with live audio): shown when the job starts running.
  renderLive(entry, url) {
    const r = entry.rendered;
    const root = document.getElementById("live-template").content.firstElementChild.cloneNode(true);
    const p = entry.view.parameters || {};
    root.querySelector("audio").setAttribute("aria-label", `Take 1 of “${titleOf(entry)}”, live`);
    r.takes.prepend(root);
    const player = attachLivePlayer(root, url, { durationS: p.duration_s || 1, lrc: p.lrc });
    r.live = { root, ...player };
    player.done.catch((err) => {
      root.querySelector(".now-line").textContent = `The live audio stopped: ${err.message}`;
    });
  }

  // The finished take 1 takes over from the live player where it is, playing if it was.
  handOver(entry, audio) {
    const live = entry.rendered.live;
    if (!live) return;
    entry.rendered.live = null;
    const go = () => {
      const playing = !live.audio.paused && !live.audio.ended;
      audio.currentTime = live.audio.currentTime;
      if (playing) audio.play().catch(() => {});
      live.audio.pause();
      live.root.remove();
      audio.closest(".take").dataset.tookOverAt = audio.currentTime.toFixed(2);
    };
    if (audio.readyState >= 1) go();
    else audio.addEventListener("loadedmetadata", go, { once: true });
  }

  renderTake(entry, take) {
    const r = entry.rendered;
    const root = this.takeTemplate.content.firstElementChild.cloneNode(true);
    const p = entry.view.parameters || {};
    root.dataset.take = take.n;
    root.querySelector(".take-title").textContent = `Take ${take.n}`;
    root.querySelector(".take-meta").textContent =
      `Seed ${take.seed} · ${formatTime(take.duration_s)} · ${take.format.toUpperCase()} · ${p.steps} steps · guidance ${p.cfg_strength} · ` +
      (p.style_prompt ? `style “${p.style_prompt}”` : "style from a reference clip");
    const audio = root.querySelector("audio");
    audio.setAttribute("aria-label", `Take ${take.n} of “${titleOf(entry)}”`);
    for (const button of root.querySelectorAll(".download")) {
      button.setAttribute("aria-label", `Download take ${take.n} as ${button.dataset.format.toUpperCase()}`);
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          const blob = await audioBlob(take.audio_url, button.dataset.format);
          const a = document.createElement("a");
          a.href = URL.createObjectURL(blob);
          a.download = `${entry.id}-take${take.n}.${button.dataset.format}`;
          a.click();
          setTimeout(() => URL.revokeObjectURL(a.href), 10000);
        } catch (err) {
          this.hooks.notice(`${err.message}. ${err.recovery || ""}`);
        } finally {
          button.disabled = false;
        }
      });
    }
    root.querySelector(".again").addEventListener("click", () => this.hooks.again(entry, take));
    const start = root.querySelector(".edit-start");
    const end = root.querySelector(".edit-end");
    start.value = "0";
    end.value = String(Math.min(10, Math.floor(take.duration_s)));
    start.max = end.max = String(take.duration_s);
    root.querySelector(".section-edit").hidden = !this.hooks.canEdit(p.model);
    root.querySelector(".regenerate").addEventListener("click", () =>
      this.hooks.regenerate(entry, take, Number(start.value), Number(end.value)),
    );
    r.takes.append(root);
    attachPlayer(root, take, p.lrc).then((audio) => {
      if (take.n === 1) this.handOver(entry, audio);
    }).catch((err) => {
      const note = root.querySelector(".now-line");
      note.textContent = `The audio could not be loaded: ${err.message}`;
      note.removeAttribute("aria-hidden");
    });
  }
}
