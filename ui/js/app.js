// The page: the song form (lyrics with timing and error lines, style, settings, edit mode), the API key,
// the theme, and the job list. Talks to the service through the public REST API only.

import { ApiError, api, apiKey, audioBlob, setApiKey } from "./api.js";
import { JobList, requestFromParameters } from "./jobs.js";
import { lyricItems, renderLineView, selectLine, timingEditor, writeLrc } from "./lyrics.js";

const $ = (id) => document.getElementById(id);
const form = $("song-form");
const lyrics = $("lyrics");
const state = { models: [], referenceId: null, edit: null, stepsModel: null };

function announce(text) {
  const live = $("live");
  live.textContent = "";
  setTimeout(() => (live.textContent = text), 50); // a new node text is announced even if it repeats
}

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

function showError(box, err) {
  box.replaceChildren();
  if (!err) {
    box.hidden = true;
    return;
  }
  const msg = document.createElement("p");
  msg.textContent = err instanceof ApiError ? `${err.code}: ${err.message}` : String(err.message || err);
  box.append(msg);
  if (err.recovery) {
    const hint = document.createElement("p");
    hint.className = "recovery";
    hint.textContent = `Hint: ${err.recovery}`;
    box.append(hint);
  }
  box.hidden = false;
}

// -- theme: the system's unless the user chose -----------------------------------------------------
function applyTheme(theme) {
  const dark = theme ? theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("theme").setAttribute("aria-pressed", String(dark));
}
applyTheme(localStorage.getItem("musicgen.theme"));
$("theme").addEventListener("click", () => {
  const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  localStorage.setItem("musicgen.theme", next);
  applyTheme(next);
});

// -- API key ---------------------------------------------------------------------------------------
$("api-key").value = apiKey();
$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  setApiKey($("api-key").value);
  $("key-box").open = false;
  notice("");
  await loadModels();
  await loadRemoteJobs();
});
$("key-forget").addEventListener("click", () => {
  setApiKey("");
  $("api-key").value = "";
});

function needKey(err) {
  if (err instanceof ApiError && err.status === 401) {
    notice(`${err.message}. ${err.recovery || "Enter your API key."}`);
    $("key-box").open = true;
    $("api-key").focus();
    return true;
  }
  return false;
}

// -- models and durations ----------------------------------------------------------------------------
async function loadModels() {
  try {
    state.models = await api.models();
  } catch (err) {
    if (!needKey(err)) notice(`The service did not answer: ${err.message}`);
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(
    ...state.models.map((m) => {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = `${m.name}${m.untrained ? " (untrained demo)" : ""}${m.loaded ? "" : " (not ready)"}`;
      return o;
    }),
  );
  if (chosen) select.value = chosen;
  applyModelLimits();
}

function currentModel() {
  return state.models.find((x) => x.name === $("model").value) || { timed_lyrics: true, edits: true };
}

function applyModelLimits() {
  const m = state.models.find((x) => x.name === $("model").value);
  if (!m) return;
  const d = $("duration");
  d.min = m.min_seconds;
  d.max = m.max_seconds;
  if (!d.value || Number(d.value) < m.min_seconds || Number(d.value) > m.max_seconds) d.value = m.min_seconds;
  $("takes").max = m.max_takes;
  // steps mean something else in each family (DiffRhythm 2 counts grid points): a newly chosen model
  // starts from its own default
  if (state.stepsModel !== m.name) {
    $("steps").value = m.default_steps;
    state.stepsModel = m.name;
  }
  $("time-lyrics").textContent = m.timed_lyrics ? "Show timing" : "Check lyrics";
  $("lyrics-help").textContent = m.timed_lyrics
    ? "Plain lines (timed for you) or LRC [mm:ss.xx] lines. Section tags such as [Verse] and [Chorus] go on their own line."
    : "Plain lines with section tags ([verse], [chorus], [bridge], ...) on their own lines; this model places the lyrics itself.";
}
$("model").addEventListener("change", applyModelLimits);

// -- style: keywords from the official prompt list, or a reference clip ------------------------------
async function loadKeywords() {
  const words = await (await fetch("/ui/official/music_prompt_keywords.json")).json();
  const list = $("keywords");
  const chips = $("chips");
  for (const [group, items] of Object.entries(words)) {
    for (const word of items) {
      const o = document.createElement("option");
      o.value = word;
      list.append(o);
    }
    const box = document.createElement("div");
    box.className = "chip-group";
    const label = document.createElement("span");
    label.className = "hint";
    label.textContent = group[0].toUpperCase() + group.slice(1) + ":";
    box.append(label);
    for (const word of items.slice(0, 10)) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chip";
      b.textContent = word;
      b.setAttribute("aria-label", `Add ${word} to the style`);
      b.addEventListener("click", () => {
        const style = $("style");
        const parts = style.value.split(",").map((s) => s.trim()).filter(Boolean);
        if (!parts.includes(word)) parts.push(word);
        style.value = parts.join(", ");
      });
      box.append(b);
    }
    chips.append(box);
  }
}

function styleKind() {
  return form.querySelector("input[name=style-kind]:checked").value;
}
for (const radio of form.querySelectorAll("input[name=style-kind]")) {
  radio.addEventListener("change", () => {
    $("style-text").hidden = styleKind() !== "text";
    $("style-audio").hidden = styleKind() !== "audio";
  });
}
$("reference").addEventListener("change", async () => {
  const file = $("reference").files[0];
  const status = $("reference-status");
  state.referenceId = null;
  if (!file) return;
  status.textContent = `Uploading ${file.name}…`;
  try {
    const up = await api.upload(file);
    state.referenceId = up.id;
    status.textContent = `${file.name}: ${up.duration_s.toFixed(1)} s, ready.`;
  } catch (err) {
    status.textContent = `${err.code || "Error"}: ${err.message}. ${err.recovery || ""}`;
  }
});

// -- lyrics: examples, instrumental, timing, errors ---------------------------------------------------
$("example").addEventListener("change", async () => {
  const name = $("example").value;
  if (!name) return;
  lyrics.value = await (await fetch(`/ui/official/${name}`)).text();
  lyricsChanged();
});
$("instrumental").addEventListener("change", () => {
  lyrics.disabled = $("instrumental").checked;
  $("time-lyrics").disabled = $("instrumental").checked;
});

function lyricsError(err) {
  const line = err && err.details && err.details.line;
  showError($("lyrics-error"), err);
  lyrics.setAttribute("aria-invalid", err ? "true" : "false");
  renderLineView($("lyric-lines"), lyrics.value, line ? { line, message: err.message } : null);
  if (line) selectLine(lyrics, line);
}

function lyricsChanged() {
  lyricsError(null);
  $("timing").hidden = true;
}
lyrics.addEventListener("input", lyricsChanged);

$("time-lyrics").addEventListener("click", async () => {
  const items = lyricItems(lyrics.value);
  let answer;
  try {
    answer = await api.timing({ lyrics: lyrics.value, model: $("model").value || null, duration_s: Number($("duration").value) || null });
  } catch (err) {
    if (needKey(err)) return;
    if (err.code === "INVALID_LYRICS" || err.details.line) lyricsError(err);
    else showError($("lyrics-error"), err);
    return;
  }
  lyricsError(null);
  if (!currentModel().timed_lyrics) {
    // DiffRhythm 2 places the lines itself: show them as it reads them (tags normalised)
    $("timing").hidden = true;
    notice(`${answer.model} places the lyrics itself (section tags guide it): ${answer.lrc.split("\n").length} lines. ${answer.warnings.join(" ")}`);
    return;
  }
  const rows = answer.lines.map((l) => ({ time: l.time_s, text: l.text }));
  timingEditor($("timeline"), $("timing-rows"), rows, answer.duration_s, (changed) => {
    lyrics.value = writeLrc(changed, items);
  });
  lyrics.value = writeLrc(rows, items);
  $("timing").hidden = false;
  if (answer.warnings.length) notice(answer.warnings.join(" "));
});

// -- edit mode: regenerate a section of a take ---------------------------------------------------------
function setEdit(edit) {
  state.edit = edit;
  $("edit-box").hidden = !edit;
  $("edit-summary").textContent = edit ? `Editing take ${edit.take} of “${edit.title}”: regenerating ${edit.start}–${edit.end} s. Change the lyrics or style if you like, then Generate.` : "";
  $("generate").textContent = edit ? "Regenerate section" : "Generate";
}
$("edit-clear").addEventListener("click", () => setEdit(null));

function fillForm(body) {
  lyrics.value = body.lyrics || "";
  $("instrumental").checked = !body.lyrics;
  lyrics.disabled = !body.lyrics;
  if (body.model) $("model").value = body.model;
  applyModelLimits();
  if (body.duration_s) $("duration").value = body.duration_s;
  $("takes").value = body.num_takes || 1;
  $("steps").value = body.steps ?? currentModel().default_steps ?? "";
  $("format").value = body.output_format || "mp3";
  $("seed").value = body.seed ?? "";
  if (body.style_prompt) {
    form.querySelector("input[value=text]").checked = true;
    $("style").value = body.style_prompt;
  } else if (body.reference_audio_id) {
    form.querySelector("input[value=audio]").checked = true;
    state.referenceId = body.reference_audio_id;
    $("reference-status").textContent = "Using the same reference clip.";
  }
  $("style-text").hidden = styleKind() !== "text";
  $("style-audio").hidden = styleKind() !== "audio";
  lyricsChanged();
  $("write").scrollIntoView({ block: "start" });
  $("write").focus();
}

// -- submitting -------------------------------------------------------------------------------------
function formBody() {
  const body = {
    lyrics: $("instrumental").checked ? "" : lyrics.value,
    model: $("model").value || null,
    duration_s: Number($("duration").value) || null,
    num_takes: Number($("takes").value) || 1,
    steps: Number($("steps").value) || null, // empty: the model's default
    output_format: $("format").value,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (styleKind() === "text") body.style_prompt = $("style").value;
  else body.reference_audio_id = state.referenceId;
  if (state.edit) body.edit = { source_id: state.edit.sourceId, segments: [[state.edit.start, state.edit.end]] };
  return body;
}

async function submit(body) {
  const view = await api.submit(body);
  jobs.add(view, body);
  announce(`Song queued: ${view.id.slice(0, 8)}`);
  return view;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  showError($("submit-error"), null);
  const body = formBody();
  if (styleKind() === "audio" && !body.reference_audio_id) {
    showError($("submit-error"), { message: "No reference clip uploaded", recovery: "choose an audio file of at least 10 s, or use a text prompt" });
    return;
  }
  $("generate").disabled = true;
  try {
    await submit(body);
    setEdit(null);
  } catch (err) {
    if (needKey(err)) return;
    if (err.code === "INVALID_LYRICS" || (err.details && err.details.line)) lyricsError(err);
    showError($("submit-error"), err);
  } finally {
    $("generate").disabled = false;
  }
});

// -- the job list -------------------------------------------------------------------------------------
const jobs = new JobList($("job-list"), $("no-songs"), {
  announce,
  notice,
  canEdit: (model) => (state.models.find((m) => m.name === model) || { edits: true }).edits,
  liveAudio: (model) => (state.models.find((m) => m.name === model) || {}).live_audio === true,
  retry: async (entry) => {
    const body = entry.request || requestFromParameters(entry.view.parameters);
    try {
      await submit(body);
    } catch (err) {
      if (!needKey(err)) notice(`${err.code}: ${err.message}. ${err.recovery || ""}`);
    }
  },
  again: (entry, take) => {
    const body = requestFromParameters(entry.view.parameters);
    setEdit(null);
    fillForm({ ...body, seed: take.seed, num_takes: 1 });
  },
  regenerate: async (entry, take, start, end) => {
    if (!(end > start)) {
      notice("Choose a section whose end is after its start.");
      return;
    }
    notice(`Preparing take ${take.n} for editing…`);
    try {
      const source = await api.upload(await audioBlob(take.audio_url, "wav"));
      fillForm({ ...requestFromParameters(entry.view.parameters), seed: take.seed, num_takes: 1 });
      setEdit({ sourceId: source.id, start, end, take: take.n, title: entry.rendered.title.textContent });
      notice("");
    } catch (err) {
      if (!needKey(err)) notice(`${err.code || "Error"}: ${err.message}. ${err.recovery || ""}`);
    }
  },
});

async function loadRemoteJobs() {
  if (!apiKey()) return;
  try {
    jobs.merge(await api.songs());
  } catch (err) {
    needKey(err);
  }
}

jobs.load();
await loadModels();
await loadKeywords();
await loadRemoteJobs();
document.body.dataset.ready = "true";
