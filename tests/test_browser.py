"""The node pack as a user sees it: ComfyUI's own frontend in headless Chromium (playwright),
against the real server of tests/comfy_harness.py. The assertions read the page's graph state
and the extension's panel state; the screenshots (out/browser/ unless $ITERIS_BROWSER_OUT) are
for a person to look at."""

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from comfy_harness import CUSTOM_NODE_NAME
from comfy_harness import TEST_CHECKPOINT_NAME as CKPT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = os.environ.get("ITERIS_CHROMIUM", "/usr/lib/chromium/chromium-headless-shell")
SHOTS = Path(os.environ.get("ITERIS_BROWSER_OUT", REPO / "out" / "browser"))
# Frontend settings: no templates dialog on first load (it would cover the canvas), no minimap.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
# The frontend logs one TypeError of its own on load (inside its bundle), and the resources it
# fails to fetch offline (failed requests of this pack are checked on their own); anything else fails.
KNOWN_CONSOLE_ERRORS = ("reading 'id'", "Failed to load resource")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium-headless-shell, or set ITERIS_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, comfy_server, comfy_lora_pair):
    comfy_server._request("POST", "/settings", SETTINGS)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the "Nodes 2.0" banner
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and CUSTOM_NODE_NAME in r.url and errors.append(f"{r.status} {r.url}"))
    page.goto(comfy_server.url)
    page.wait_for_function("() => !!(window.app?.graph && LiteGraph.registered_node_types['IterIS_Merge'])", timeout=60_000)
    yield page
    page.close()
    unexpected = [e for e in errors if not any(k in e for k in KNOWN_CONSOLE_ERRORS)]
    assert not unexpected, unexpected


def load(page, workflow: dict) -> None:
    page.evaluate("async (w) => { await app.loadGraphData(w); app.graph.setDirtyCanvas(true, true); }", workflow)
    page.wait_for_timeout(1500)  # the canvas draws on its next frames


def shoot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


NODES_JS = """() => app.graph._nodes.map((n) => ({
  id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size], min: [...n.computeSize()],
  known: !!LiteGraph.registered_node_types[n.type],
  chart: n.widgets?.find((w) => w.name === 'iteris_chart') ? (() => {
    const w = n.widgets.find((w) => w.name === 'iteris_chart');
    return { top: w.last_y ?? w.y, height: w.computeSize(n.size[0])[1] };
  })() : null,
}))"""


def overlaps(a, b, title=30) -> bool:
    """Do two nodes' boxes, title bars included, overlap?"""
    (ax, ay), (aw, ah) = a["pos"], a["size"]
    (bx, by), (bw, bh) = b["pos"], b["size"]
    return ax < bx + bw and bx < ax + aw and ay - title < by + bh and by - title < ay + ah


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_reads_well(page, comfy_server, path):
    workflow = json.loads(path.read_text())
    load(page, workflow)
    shot = shoot(page, path.stem)
    nodes = page.evaluate(NODES_JS)
    assert len(nodes) == len(workflow["nodes"])
    assert [n["type"] for n in nodes if not n["known"]] == []
    saved = {n["id"]: n["size"] for n in workflow["nodes"]}
    grown = {n["title"]: (saved[n["id"]], n["size"]) for n in nodes if n["size"] != saved[n["id"]]}
    assert grown == {}, shot  # the sizes as saved already show everything: the frontend enlarged none
    small = {n["title"]: (n["size"], n["min"]) for n in nodes if n["size"][0] < n["min"][0] or n["size"][1] < n["min"][1]}
    assert small == {}, shot  # every widget (and the Merge node's chart) inside the node as saved
    clashes = [(a["title"], b["title"]) for k, a in enumerate(nodes) for b in nodes[k + 1:] if overlaps(a, b)]
    assert clashes == [], shot
    (merge,) = [n for n in nodes if n["type"] == "IterIS_Merge"]
    assert merge["chart"]["top"] + merge["chart"]["height"] <= merge["size"][1]
    assert merge["chart"]["height"] >= 200
    assert workflow["extra"]["ds"]["scale"] >= 0.6  # opens at a zoom where node text is drawn
    groups = page.evaluate("() => app.graph._groups.map((g) => g.title)")
    assert len(groups) >= 4 and all(groups)
    assert any(n["type"] == "Note" for n in workflow["nodes"])
    # in the template browser: listed under its readable name, with its .jpg card beside it
    assert path.stem in comfy_server.get("/api/workflow_templates")[CUSTOM_NODE_NAME]
    for suffix in (".json", ".jpg"):
        assert comfy_server.get(f"/api/workflow_templates/{CUSTOM_NODE_NAME}/{quote(path.stem + suffix)}"), suffix


def tiny(workflow: dict, loras, *, iterations=1, steps=1) -> dict:
    """The minimal workflow on the test checkpoint and LoRAs, at the smallest sizes its widgets allow."""
    workflow = json.loads(json.dumps(workflow))
    for n in workflow["nodes"]:
        v = n["widgets_values"]
        if n["type"] == "CheckpointLoaderSimple":
            v[0] = CKPT
        elif n["type"] == "IterIS_LoraEntry":
            v[0] = loras[0] if n["title"].endswith(" A") else loras[1]
        elif n["type"] == "IterIS_Merge":
            v[1], v[5], v[6], v[7] = iterations, steps, 1, 64  # iterations, steps, timesteps, resolution
        elif n["type"] == "EmptyLatentImage":
            v[0] = v[1] = 64
        elif n["type"] == "KSampler":
            v[2] = 1
        elif n["type"] == "IterIS_SaveLora":
            v[0], v[2] = "browser_merge", True
    return workflow


MINIMAL = REPO / "example_workflows" / "IterIS - merge two LoRAs.json"
STATE_JS = """() => { const n = app.graph._nodes.find((n) => n.type === 'IterIS_Merge');
  const s = app.graph._nodes.find((n) => n.type === 'IterIS_SaveLora');
  const group = app.graph._groups.find((g) => g.title === '3. Merge');
  return { state: n.iterisState ?? null, report: n.iterisReport.value, saved: s.iterisReport.value,
           size: [...n.size], min: [...n.computeSize()], merge_box: [...n.pos, ...n.size],
           group: group ? [...group.pos, ...group.size] : null }; }"""


def inside(box, frame) -> bool:
    (x, y, w, h), (fx, fy, fw, fh) = box, frame
    return fx <= x and fy <= y and x + w <= fx + fw and y + h <= fy + fh


# the Merge node at its size without a report, its group tight around it: the report must grow both
SHRINK_JS = """() => { const n = app.graph._nodes.find((n) => n.type === 'IterIS_Merge');
  n.setSize([n.size[0], n.computeSize()[1]]);
  const g = app.graph._groups.find((g) => g.title === '3. Merge');
  g.size = [n.pos[0] + n.size[0] + 20 - g.pos[0], n.pos[1] + n.size[1] + 20 - g.pos[1]]; }"""


def test_merge_shows_progress_chart_and_report(page, comfy_server, comfy_lora_pair):
    load(page, tiny(json.loads(MINIMAL.read_text()), comfy_lora_pair))
    page.evaluate(SHRINK_JS)
    shrunk = page.evaluate(STATE_JS)
    started = time.monotonic()
    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function("() => app.graph._nodes.find((n) => n.type === 'IterIS_Merge').iterisState?.status === 'running'",
                           timeout=120_000)
    running = page.evaluate(STATE_JS)["state"]
    assert running["concepts"] == list(comfy_lora_pair)  # the names, from the first message on
    page.wait_for_function("() => app.graph._nodes.find((n) => n.type === 'IterIS_SaveLora').iterisReport.value",
                           timeout=1_500_000, polling=1000)
    seconds = time.monotonic() - started
    page.wait_for_timeout(1000)
    shoot(page, "merge-finished")
    out = page.evaluate(STATE_JS)
    state = out["state"]
    assert state["status"] == "done" and state["concepts"] == list(comfy_lora_pair)
    assert 0 < state["estimate"] < 10 * seconds  # the whole merge's time, estimated from its timed calls
    assert len(state["history"]) == 2 and state["chosen"] in (0, 1)
    assert f"iteration {state['chosen']} kept" in out["report"] and all(n in out["report"] for n in comfy_lora_pair)
    saved = comfy_server.models_dir / "loras" / "browser_merge.safetensors"
    assert out["saved"].startswith("saved browser_merge.safetensors") and str(saved.resolve()) in out["saved"]
    assert saved.is_file()
    assert out["size"][1] >= out["min"][1] and out["size"][1] > shrunk["size"][1]  # the node grew to show its report
    assert inside(out["merge_box"], out["group"]) and not inside(out["merge_box"], shrunk["group"])  # and its group with it
    print(f"browser merge: {seconds:.0f} s")


def test_cancel_is_shown_and_other_prompts_do_not_paint(page, comfy_server, comfy_lora_pair):
    load(page, tiny(json.loads(MINIMAL.read_text()), comfy_lora_pair, iterations=40, steps=4))
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    # the same graph (same node ids) queued by another client: this page must not show it
    foreign = comfy_server.post(prompt)
    _wait_running(comfy_server, foreign)
    time.sleep(5)
    assert page.evaluate(STATE_JS)["state"] is None
    comfy_server.interrupt()
    _wait_done(comfy_server, foreign)

    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function("() => { const s = app.graph._nodes.find((n) => n.type === 'IterIS_Merge').iterisState;"
                           " return s?.status === 'running' && s.phase !== 'start'; }", timeout=120_000)
    comfy_server.interrupt()
    page.wait_for_function("() => app.graph._nodes.find((n) => n.type === 'IterIS_Merge').iterisState.status !== 'running'",
                           timeout=60_000)
    page.wait_for_timeout(500)
    shoot(page, "merge-cancelled")
    state = page.evaluate(STATE_JS)["state"]
    assert state["status"] == "cancelled", state


def _wait_running(server, prompt_id, timeout=900):
    deadline = time.monotonic() + timeout
    while not any(item[1] == prompt_id for item in server.queue().get("queue_running", [])):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.2)


def _wait_done(server, prompt_id, timeout=120):
    deadline = time.monotonic() + timeout
    while server.history(prompt_id) is None:
        assert time.monotonic() < deadline, "the interrupted prompt never ended"
        time.sleep(0.2)
