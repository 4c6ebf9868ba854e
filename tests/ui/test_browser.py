"""The web UI in a real browser: Playwright drives Debian's Chromium (headless, launched by path, its
background networking off) against the app on a real server, with the tiny model generating on a
worker thread. Every test fails on a console error, a page error, a failed request or an HTTP error
it did not provoke. Screenshots of the main states go to outputs/ui/ (git-ignored), to look at.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest
import redis

from deployments.service.storage import LocalStorage
from tests.conftest import ROOT
from tests.deployments.service.api.conftest import LiveApi, make_services

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
SHOTS = ROOT / "outputs" / "ui"
SONG = {"lyrics": "Hello world\nGood night moon", "style": "Pop, Happy", "duration": "8", "steps": "3"}
FINAL = "li.job[data-status=succeeded], li.job[data-status=failed], li.job[data-status=canceled]"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (scripts/test.sh installs it)",
)


class Pace:
    """Seconds each model evaluation takes at least: long enough to reload or cancel mid-song."""

    def __init__(self):
        self.seconds = 0.0

    def hold(self, owner, name: str) -> None:
        """Make `owner.name` (a model's forward) take at least `seconds` per call."""
        call = getattr(owner, name)

        def paced(*args, **kwargs):
            if self.seconds:
                time.sleep(self.seconds)
            return call(*args, **kwargs)

        setattr(owner, name, paced)


@pytest.fixture(scope="module")
def pace():
    return Pace()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from deployments.service.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture(scope="module")
def app(server, tiny_model_paths, pace, tmp_path_factory):
    from musicgen.pipelines import Pipeline

    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    pace.hold(pipe.dit, "velocity")
    redis.Redis.from_url(server.url).flushdb()
    root = tmp_path_factory.mktemp("ui-app")
    services, _ = make_services(
        server.url, pipe, LocalStorage(root / "results"), LocalStorage(root / "uploads"),
        max_queue=50, max_upload_bytes=50_000_000, ui_dir=str(ROOT / "ui"),
    )  # fmt: skip
    services.models = models
    services.worker_pipe = pipe
    with LiveApi(services, slow_s=1.0) as api:
        yield api
    services.worker_pool.shutdown(wait=True)


async def models() -> list[dict]:
    """What the ingress answers for the tiny model (deployments/service/readiness.py)."""
    from deployments.service.schemas import model_view
    from musicgen.registry import MODELS

    return [model_view(MODELS["tiny"], True, "serving tiny", 4)]


@pytest.fixture(scope="module")
def keyed_app(server, app, tmp_path_factory):
    """A second API on the same store and generator with API keys required."""
    root = tmp_path_factory.mktemp("ui-keyed")
    services, _ = make_services(
        server.url, app.services.worker_pipe, LocalStorage(root / "results"), LocalStorage(root / "uploads"),
        max_queue=50, auth=True, ui_dir=str(ROOT / "ui"),
    )  # fmt: skip
    services.models = models
    with LiveApi(services, slow_s=1.0) as api:
        yield api
    services.worker_pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()


class Watch:
    """Console errors, page errors, failed requests and HTTP errors of one page; `expect(status)` for
    the errors a test provokes on purpose (the console's 'Failed to load resource' line included)."""

    def __init__(self, page):
        self.problems: list[str] = []
        self.expected: set[int] = set()
        self.allowed: list[str] = []  # console errors a test provokes on purpose
        self.navigating = False
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def expect(self, *statuses: int) -> None:
        self.expected |= set(statuses)

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        text = msg.text
        if any(f"status of {s} " in text for s in self.expected) or any(a in text for a in self.allowed):
            return
        self.problems.append(f"console: {text}")

    def _failed(self, request) -> None:
        # an event stream cut by a reload or a closed page is the test's doing, not a failure
        if self.navigating and "/events" in request.url and "ERR_" in (request.failure or ""):
            return
        # a media element reading its own blob: URL cancels reads when it seeks or pauses (no network)
        if request.url.startswith("blob:") and "ERR_ABORTED" in (request.failure or ""):
            return
        self.problems.append(f"request failed: {request.method} {request.url} {request.failure}")

    def _response(self, response) -> None:
        if response.status >= 400 and response.status not in self.expected:
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def check(self) -> None:
        assert not self.problems, self.problems


@pytest.fixture()
def page(browser, app, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    watch = Watch(pg)
    pg.watch = watch
    pg.goto(app.base + "/")
    pg.wait_for_selector("body[data-ready=true]")
    yield pg
    with contextlib.suppress(Exception):
        watch.navigating = True
        context.close()
    watch.check()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fill_song(page, song=SONG) -> None:
    page.fill("#lyrics", song["lyrics"])
    page.fill("#style", song["style"])
    page.fill("#duration", song["duration"])
    page.fill("#steps", song["steps"])


def submit(page, song=SONG):
    fill_song(page, song)
    before = page.locator("li.job").count()
    page.click("#generate")
    page.wait_for_function(f"() => document.querySelectorAll('li.job').length > {before}")
    return page.locator(f"li.job[data-id='{page.locator('li.job').first.get_attribute('data-id')}']")


def test_submit_a_song_and_play_it(page):
    assert page.input_value("#steps") == "31"  # the model's default, from /v1/models
    job = submit(page)
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    take = job.locator(".take").first
    audio = take.locator("audio")
    page.wait_for_function("a => a.src.startsWith('blob:') && a.readyState >= 1", arg=audio.element_handle())
    assert abs(audio.evaluate("a => a.duration") - 8.0) < 0.2
    drawn = take.locator("canvas").evaluate(
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"
    )
    assert drawn > 500  # the waveform and its cursor
    audio.evaluate("a => { a.muted = true; return a.play(); }")
    page.wait_for_function("a => a.currentTime > 0.3", arg=audio.element_handle())
    audio.evaluate("a => a.pause()")
    assert "Seed" in take.locator(".take-meta").inner_text()
    # the lyric line under the cursor, from the LRC the server used
    lrc = page.evaluate(
        "id => JSON.parse(localStorage.getItem('musicgen.jobs')).find(j => j.id === id).view.parameters.lrc",
        job.get_attribute("data-id"),
    )
    audio.evaluate("a => { a.currentTime = 7.5; }")
    page.wait_for_function("t => t.dataset.time > 7", arg=take.element_handle())
    sung = take.locator(".now-line").inner_text().strip()
    assert sung in {line.split("]", 1)[1] for line in lrc.splitlines() if "]" in line}, (sung, lrc)
    with page.expect_download() as download:
        take.locator("button.download[data-format=wav]").click()
    assert download.value.suggested_filename.endswith("-take1.wav")
    shot(page, "desktop-finished")


def test_reload_mid_generation_resumes_the_job_over_its_stream(page, pace):
    pace.seconds = 0.15
    try:
        job = submit(page, {**SONG, "steps": "40"})
        job_id = job.get_attribute("data-id")
        page.wait_for_function(
            "id => { const li = document.querySelector(`li.job[data-id='${id}']`);"
            " return li && li.dataset.status === 'running' && /step [1-9]/.test(li.innerText); }",
            arg=job_id,
        )
        shot(page, "desktop-running")
        resumed = []
        page.on("request", lambda r: "/events" in r.url and resumed.append(r.headers.get("last-event-id")))
        page.watch.navigating = True
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        page.watch.navigating = False
        card = page.locator(f"li.job[data-id='{job_id}']")
        assert card.get_attribute("data-status") in {"queued", "running"}  # from localStorage, at once
        card.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
        assert resumed and resumed[0], "the stream did not resume with Last-Event-ID"
    finally:
        pace.seconds = 0.0


def test_a_new_browser_context_with_the_same_storage_finds_the_job(browser, app, page, pace):
    pace.seconds = 0.1
    try:
        job = submit(page, {**SONG, "steps": "30"})
        job_id = job.get_attribute("data-id")
        state = page.context.storage_state()
        page.watch.navigating = True
        page.context.close()  # the browser closes mid-song
        context = browser.new_context(storage_state=state, viewport={"width": 1280, "height": 900})
        again = context.new_page()
        watch = Watch(again)
        again.goto(app.base + "/")
        again.wait_for_selector("body[data-ready=true]")
        card = again.locator(f"li.job[data-id='{job_id}']")
        card.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
        assert card.locator(".take").count() == 1
        context.close()
        watch.check()
    finally:
        pace.seconds = 0.0


def test_cancel_a_running_song(page, pace):
    pace.seconds = 0.15
    try:
        job = submit(page, {**SONG, "steps": "60"})
        job.locator("xpath=self::*[@data-status='running']").wait_for(timeout=30_000)
        job.locator("button.cancel").click()
        job.locator("xpath=self::*[@data-status='canceled']").wait_for(timeout=30_000)
        assert job.locator("button.cancel").is_hidden() and job.locator("button.retry").is_visible()
        assert "Canceled" in job.locator(".progress-text").inner_text()
    finally:
        pace.seconds = 0.0


def test_a_lyrics_error_is_highlighted_on_its_line_with_its_hint(page):
    page.watch.expect(422)
    page.fill(
        "#lyrics", "[00:01.00]first line\n[00:02.00]second line\n[00:75.00]a bad timestamp\n[00:09.00]last"
    )
    page.click("#time-lyrics")
    bad = page.locator("#lyric-lines li.line-error")
    bad.wait_for()
    assert bad.get_attribute("data-line") == "3" and "a bad timestamp" in bad.inner_text()
    error = page.locator("#lyrics-error")
    assert "INVALID_LYRICS" in error.inner_text() and "Hint:" in error.inner_text()
    assert page.get_attribute("#lyrics", "aria-invalid") == "true"
    selected = page.evaluate("() => { const t = document.getElementById('lyrics');"
                             " return t.value.slice(t.selectionStart, t.selectionEnd); }")  # fmt: skip
    assert selected == "[00:75.00]a bad timestamp"
    shot(page, "desktop-lyrics-error")
    page.fill("#lyrics", "fixed")  # editing clears the mark
    assert page.locator("#lyric-lines").is_hidden() and page.locator("#lyrics-error").is_hidden()


def test_auto_timing_is_shown_and_can_be_moved_by_typing_and_keys(page):
    page.fill("#lyrics", "[Verse]\nHello world\nGood night moon\n[Chorus]\nSing it again")
    page.fill("#duration", "20")
    page.click("#time-lyrics")
    page.locator("#timing").wait_for()
    times = page.locator(".time-input")
    assert times.count() == 3
    first = [float(times.nth(i).input_value()) for i in range(3)]
    assert first == sorted(first)
    times.nth(1).fill("7.25")
    times.nth(1).dispatch_event("change")
    text = page.input_value("#lyrics")
    assert "[00:07.25]Good night moon" in text and text.splitlines()[0] == "[Verse]" and "[Chorus]" in text
    marker = page.locator(".marker").nth(2)
    marker.focus()
    before = float(marker.get_attribute("aria-valuenow"))
    page.keyboard.press("Shift+ArrowRight")
    assert float(marker.get_attribute("aria-valuenow")) == pytest.approx(before + 1, abs=0.011)
    box = page.locator("#timeline").bounding_box()
    marker0 = page.locator(".marker").nth(0)
    marker0.hover()
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] / 2)
    page.mouse.up()
    assert float(marker0.get_attribute("aria-valuenow")) == pytest.approx(5.0, abs=0.5)  # a quarter of 20 s
    assert page.input_value("#lyrics").splitlines()[1].startswith("[00:0")


def test_an_api_error_shows_its_message_and_recovery_hint(page):
    page.watch.expect(422)
    fill_song(page)
    page.fill("#duration", "500")  # the tiny model makes 5 to 95 s
    page.click("#generate")
    error = page.locator("#submit-error")
    error.wait_for()
    text = error.inner_text()
    assert "INVALID_PARAMETER" in text and "out of range" in text and "Hint: choose a duration of" in text
    assert page.locator("li.job").count() == 0 or page.locator("#no-songs").is_hidden()


def test_regenerate_a_section_of_a_take(page):
    job = submit(page)
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    take = job.locator(".take").first
    take.locator(".edit-start").fill("2")
    take.locator(".edit-end").fill("5")
    take.locator("button.regenerate").click()
    page.locator("#edit-box").wait_for()
    assert "regenerating 2–5 s" in page.locator("#edit-summary").inner_text()
    assert page.input_value("#seed") == take.locator(".take-meta").inner_text().split()[1]
    assert page.locator("#generate").inner_text() == "Regenerate section"
    page.click("#generate")
    page.wait_for_function("() => document.querySelectorAll('li.job').length === 2")
    edited = page.locator(f"li.job[data-id='{page.locator('li.job').first.get_attribute('data-id')}']")
    edited.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    assert edited.get_attribute("data-id") != job.get_attribute("data-id")
    assert "regenerates 2–5 s" in edited.locator(".job-meta").inner_text()
    assert page.locator("#edit-box").is_hidden()


def test_generate_again_with_a_takes_seed_fills_the_form(page):
    job = submit(page)
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    take = job.locator(".take").first
    seed = take.locator(".take-meta").inner_text().split()[1]
    page.fill("#lyrics", "")
    take.locator("button.again").click()
    assert page.input_value("#seed") == seed and page.input_value("#takes") == "1"
    assert "Hello world" in page.input_value("#lyrics") and page.input_value("#style") == "Pop, Happy"


def test_phone_and_dark_mode_screenshots_and_no_serious_accessibility_violations(browser, app, page):
    from axe_playwright_python.sync_playwright import Axe

    job = submit(page)
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('audio')].every(a => a.src.startsWith('blob:'))"
    )
    axe = Axe()
    for theme in ("light", "dark"):
        if page.evaluate("() => document.documentElement.dataset.theme") != theme:
            page.click("#theme")
        assert page.evaluate("() => document.documentElement.dataset.theme") == theme
        results = axe.run(page)
        serious = [v for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
        assert not serious, [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]) for v in serious]
    shot(page, "desktop-dark")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "phone-dark")
    page.click("#theme")
    shot(page, "phone-light")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"


def test_the_form_offers_the_served_models_with_their_limits(page):
    assert page.locator("#model option").all_inner_texts() == ["tiny (untrained demo)"]
    assert page.get_attribute("#duration", "min") == "5" and page.get_attribute("#duration", "max") == "95"
    page.select_option("#example", "eg_en.lrc")
    page.wait_for_function("() => document.getElementById('lyrics').value.includes('Moonlight spills')")
    page.check("#instrumental")
    assert page.locator("#lyrics").is_disabled()
    page.click("button.chip:text-is('Jazz')")
    page.click("button.chip:text-is('Piano')")
    assert page.input_value("#style") == "Jazz, Piano"


def test_a_reference_clip_as_the_style(page, tmp_path):
    import numpy as np
    import soundfile as sf

    clip = tmp_path / "reference.wav"
    t = np.arange(12 * 22050) / 22050
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 220 * t))[:, None].repeat(2, 1), 22050)
    page.check("input[name=style-kind][value=audio]")
    page.set_input_files("#reference", str(clip))
    page.wait_for_function("() => document.getElementById('reference-status').textContent.includes('ready')")
    page.fill("#lyrics", "Hello world")
    page.fill("#duration", "8")
    page.fill("#steps", "2")
    page.click("#generate")
    job = page.locator("li.job").first
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    assert "reference clip" in job.locator(".take-meta").inner_text()


def test_jobs_made_elsewhere_appear_once_the_api_key_is_given(browser, keyed_app, server):
    import httpx

    from deployments.service.store import KeyStore

    secret, _ = KeyStore.from_url(server.url).create("phone")
    made = httpx.post(keyed_app.base + "/v1/songs", headers={"Authorization": f"Bearer {secret}"},
                      json={"lyrics": "From my phone", "style_prompt": "folk", "duration_s": 8, "steps": 2})  # fmt: skip
    assert made.status_code == 202, made.text
    context = browser.new_context()
    page = context.new_page()
    watch = Watch(page)
    watch.expect(401)  # the page's first calls, before it has the key
    page.goto(keyed_app.base + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert "API key" in page.locator("#notice").inner_text()
    assert page.locator("#key-box").get_attribute("open") is not None
    page.fill("#api-key", secret)
    page.click("#key-form button[type=submit]")
    card = page.locator(f"li.job[data-id='{made.json()['id']}']")
    card.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    assert "From my phone" in card.locator(".job-title").inner_text()
    assert page.locator("#model option").count() == 1 and page.locator("#notice").is_hidden()
    context.close()
    watch.check()


def test_a_failing_event_stream_falls_back_to_polling(page, pace):
    """With every event stream refused (a proxy that drops them, say), the job is followed by polling
    GET /v1/songs/{id} with back-off until it finishes."""
    pace.seconds = 0.05
    page.watch.navigating = (
        True  # the refused streams (and the console's line for each) are this test's doing
    )
    page.watch.allowed.append("net::ERR_FAILED")
    polls = []
    page.route("**/v1/songs/*/events", lambda route: route.abort())
    page.on("request", lambda r: r.url.rstrip("/").split("/")[-2:-1] == ["songs"] and polls.append(r.url))
    try:
        job = submit(page, {**SONG, "steps": "20"})
        job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
        assert job.locator(".take").count() == 1
        assert polls, "the job was not polled"
    finally:
        pace.seconds = 0.0


@pytest.fixture(scope="module")
def dr2_pace():
    return Pace()


@pytest.fixture(scope="module")
def dr2_app(server, tmp_path_factory, dr2_pace):
    """The API serving the tiny DiffRhythm 2 (its own generator thread, each DiT call held
    `dr2_pace.seconds`), the same UI."""
    from deployments.service.schemas import model_view
    from musicgen.pipelines import Pipeline
    from musicgen.registry import MODELS

    pipe = Pipeline.from_pretrained("tiny-2", device="cpu")
    dr2_pace.hold(pipe.dit, "forward")
    root = tmp_path_factory.mktemp("ui-dr2")
    services, _ = make_services(server.url, pipe, LocalStorage(root / "results"), LocalStorage(root / "uploads"),
                                model="tiny-2", ui_dir=str(ROOT / "ui"))  # fmt: skip

    async def served() -> list[dict]:
        return [model_view(MODELS["tiny-2"], True, "serving tiny-2", 4)]

    services.models = served
    with LiveApi(services, slow_s=1.0) as api:
        yield api
    services.worker_pool.shutdown(wait=True)


def test_a_diffrhythm_2_song_from_section_tagged_lyrics(browser, dr2_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch(page)
    page.goto(dr2_app.base + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#model option").all_inner_texts() == ["tiny-2 (untrained demo)"]
    assert "section tags" in page.locator("#lyrics-help").inner_text()
    assert page.input_value("#steps") == "16"  # the model's default, from /v1/models
    page.fill("#lyrics", "[Verse]\nHello world\n[chorus]\nGood night moon")
    page.fill("#style", "folk")
    page.fill("#duration", "4")
    page.fill("#steps", "3")
    page.click("#time-lyrics")  # "Check lyrics": no timing editor for a model that places lines itself
    page.wait_for_function(
        "() => document.getElementById('notice').textContent.includes('places the lyrics itself')"
    )
    assert page.locator("#timing").is_hidden()
    page.click("#generate")
    job = page.locator("li.job").first
    job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    take = job.locator(".take").first
    audio = take.locator("audio")
    page.wait_for_function("a => a.src.startsWith('blob:') && a.readyState >= 1", arg=audio.element_handle())
    assert abs(audio.evaluate("a => a.duration") - 4.0) < 0.1
    assert take.locator(".section-edit").is_hidden()  # DiffRhythm 2 has no edit mode
    shot(page, "desktop-dr2")
    context.close()
    watch.check()


def test_a_diffrhythm_2_song_plays_while_it_is_written_then_its_take_takes_over(browser, dr2_app, dr2_pace):
    """A live player shows as soon as the job runs: its audio plays (currentTime advances) while the
    song is still being written, its waveform grows, and the finished take takes over where it is,
    still playing; what the page heard is the take's MP3, byte for byte."""
    import hashlib

    import httpx

    dr2_pace.seconds = 0.1  # the song is written over ~5 s: longer than its first audio takes to come
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch(page)
    try:
        page.goto(dr2_app.base + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#lyrics", "[verse]\nHello world\n[chorus]\nGood night moon")
        page.fill("#style", "folk")
        page.fill("#duration", "30")
        page.fill("#steps", "3")
        page.click("#generate")
        job = page.locator("li.job").first
        live = job.locator(".take.live")
        live.wait_for(timeout=60_000)
        heard = live.element_handle()
        audio = live.locator("audio").element_handle()
        page.wait_for_function("a => a.currentTime > 0.3", arg=audio, timeout=60_000)
        assert job.get_attribute("data-status") == "running", (
            "the live audio played only once the song was done"
        )
        first = audio.evaluate("a => a.currentTime")
        page.wait_for_function(f"a => a.currentTime > {first} + 0.2", arg=audio, timeout=10_000)
        page.wait_for_function("el => Number(el.dataset.liveSeconds || 0) > 0", arg=heard, timeout=10_000)
        shot(page, "desktop-dr2-live")
        job.locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
        take = job.locator(".take[data-took-over-at]")
        take.wait_for(timeout=30_000)
        assert job.locator(".take.live").count() == 0  # the live player gave way
        took_over = float(take.get_attribute("data-took-over-at"))
        final = take.locator("audio").element_handle()
        assert took_over > first  # where the live player was, not the start
        page.wait_for_function(
            f"a => !a.paused && a.currentTime > {took_over} + 0.2", arg=final, timeout=10_000
        )
        page.wait_for_function("el => el.dataset.liveDone === 'true'", arg=heard, timeout=30_000)
        job_id = job.get_attribute("data-id")
        mp3 = httpx.get(f"{dr2_app.base}/v1/songs/{job_id}/takes/1/audio?format=mp3").content
        assert heard.get_attribute("data-live-bytes") == str(len(mp3))
        assert heard.get_attribute("data-live-sha256") == hashlib.sha256(mp3).hexdigest()
    finally:
        dr2_pace.seconds = 0.0
        context.close()
    watch.check()


def test_diffrhythm_1_offers_no_live_player(page, pace):
    pace.seconds = 0.01
    try:
        job = submit(page)
        job.locator("xpath=self::*[@data-status='running']").wait_for(timeout=30_000)
        job.locator(
            f"xpath=self::*[{' or '.join(f'@data-status={s!r}' for s in ('succeeded', 'failed'))}]"
        ).wait_for(timeout=60_000)
    finally:
        pace.seconds = 0.0
    assert job.locator(".take.live").count() == 0 and job.locator(".take").count() >= 1
