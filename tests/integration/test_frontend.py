"""ComfyUI's own web frontend with the pack, in a headless Chromium driven by Playwright.

Every file in workflows/ is dropped onto the page the way a user drops it (a `drop` event carrying the file), then:
no node type may be missing, no error notice, dialog or console error may appear, every widget value of the pack's
nodes must survive the load and lie within the limits the server declares, and the workflow is queued from the page
(at a small size, set through the page's widgets) and must save its images.

A screenshot of each loaded graph is written to $LUMINA_SCREENSHOT_DIR (default: output/frontend_screenshots in the
repository) so a person can look.

Needs, besides COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`): Playwright from PyPI and a Chromium
(`apt-get install chromium`, or LUMINA_CHROMIUM naming one). Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import FRONTEND_ONLY, REPO, load_workflows, ui_to_api, widget_inputs  # noqa: E402
from tests.integration.comfy_server import (  # noqa: E402
    INPUT_IMAGE,
    execution_error,
    png_size,
    preset_size,
    requires_comfyui,
    small_prompt,
    start_server,
)

pytestmark = requires_comfyui

CHROMIUM = os.environ.get("LUMINA_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("LUMINA_SCREENSHOT_DIR", REPO / "output" / "frontend_screenshots"))
# Flags that keep Chromium off the network (this machine has none) and off the GPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The workflows name ComfyUI's default LoadImage file; the page fetches it for the preview.
DEFAULT_LOAD_IMAGE = "example.png"
WORKFLOWS = load_workflows()
PACK_PREFIX = "Lumina"

DROP_FILE = """async ([text, name]) => {
    const file = new File([text], name, {type: 'application/json'});
    const data = new DataTransfer();
    data.items.add(file);
    const target = document.querySelector('#graph-canvas') || document.body;
    for (const type of ['dragenter', 'dragover', 'drop']) {
        target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
    }
}"""

GRAPH_STATE = """() => {
    const graph = window.app.graph;
    return {
        nodes: graph.serialize().nodes.map(n => ({id: String(n.id), type: n.type, widgets_values: n.widgets_values})),
        unregistered: graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
        with_errors: graph._nodes.filter(n => n.has_errors).map(n => `${n.id} (${n.type})`),
    };
}"""

# Error notices of the frontend: its notification panels (role=status with the destructive colour), alerts, error
# toasts and any open dialog.
ERROR_NOTICES = """() => {
    const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
    const selectors = ['[role=status][class*=destructive]', '[role=alert]', '.p-toast-message-error',
                       '.p-dialog', '[role=dialog]'];
    const out = [];
    for (const el of document.querySelectorAll(selectors.join(','))) {
        if (visible(el)) out.push(el.innerText.trim().replace(/\\s+/g, ' ').slice(0, 300));
    }
    return out;
}"""

FIT_VIEW = """async () => {
    await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
    window.app.graph.setDirtyCanvas(true, true);
}"""

SET_WIDGETS = """(values) => {
    const missing = [];
    for (const [id, inputs] of Object.entries(values)) {
        const node = window.app.graph.getNodeById(Number(id)) || window.app.graph.getNodeById(id);
        for (const [name, value] of Object.entries(inputs)) {
            const widget = node && (node.widgets || []).find(w => w.name === name);
            if (!widget) { missing.push(`${id}.${name}`); continue; }
            widget.value = value;
            if (widget.callback) widget.callback(value, window.app.canvas, node);
        }
    }
    window.app.graph.setDirtyCanvas(true, true);
    return missing;
}"""


class Page:
    """The ComfyUI page in Chromium, recording console errors and failed requests."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} ({r.failure})"))

    def open(self):
        self.page.goto(self.server.url)
        self.page.wait_for_function("() => window.app && window.app.vueAppReady && window.app.graph && window.app.canvas",
                                    timeout=120_000)
        self.page.wait_for_timeout(1000)
        self.page.keyboard.press("Escape")  # the template browser a new user sees first

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_frontend"))
    shutil.copy(srv.base / "input" / INPUT_IMAGE, srv.base / "input" / DEFAULT_LOAD_IMAGE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser_page(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install playwright (its browser download is not needed)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set LUMINA_CHROMIUM to a Chromium")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = Page(browser.new_page(viewport={"width": 2560, "height": 1440}), server)
        page.open()
        # The empty page's own noise (user.css and empty user folders answer 404) is not the pack's.
        page.take_errors()
        yield page
        browser.close()


def limit_problems(info: dict, values: dict) -> list[str]:
    """Widget values outside what the server declares: min/max of numbers, the options of a combo."""
    problems = []
    for name, typ, opts, _control in widget_inputs(info):
        if name not in values:
            continue
        value = values[name]
        if isinstance(typ, list):
            if value not in typ:
                problems.append(f"{name} = {value!r} is not one of {typ}")
        elif typ in ("INT", "FLOAT"):
            if "min" in opts and value < opts["min"]:
                problems.append(f"{name} = {value!r} is below its minimum {opts['min']}")
            if "max" in opts and value > opts["max"]:
                problems.append(f"{name} = {value!r} is above its maximum {opts['max']}")
    return problems


def _widget_names(info: dict) -> list[str]:
    """The names the frontend gives the widgets of a node, in widgets_values order."""
    names = []
    for name, _typ, _opts, control in widget_inputs(info):
        names.append(name)
        if control:
            names.append("control_after_generate")
    return names


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_in_the_web_frontend(server, browser_page, name):
    workflow = WORKFLOWS[name]
    page = browser_page.page
    browser_page.take_errors()

    page.evaluate(DROP_FILE, [json.dumps(workflow), name])
    expected_ids = sorted(str(n["id"]) for n in workflow["nodes"])
    page.wait_for_function(
        "(ids) => JSON.stringify(window.app.graph._nodes.map(n => String(n.id)).sort()) === JSON.stringify(ids)",
        arg=expected_ids, timeout=60_000)
    page.evaluate(FIT_VIEW)
    page.wait_for_timeout(800)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(name).stem}.png"))

    state = page.evaluate(GRAPH_STATE)
    where = f"workflow {name}"
    assert not state["unregistered"], f"{where}: node types missing in ComfyUI: {state['unregistered']}"
    assert not state["with_errors"], f"{where}: nodes flagged with errors by the frontend: {state['with_errors']}"
    notices = page.evaluate(ERROR_NOTICES)
    assert not notices, f"{where}: the frontend shows errors after loading: {notices}"
    errors = browser_page.take_errors()
    assert not errors, f"{where}: console errors while loading: {errors}"

    loaded = {n["id"]: n for n in state["nodes"]}
    for node in workflow["nodes"]:
        node_id, kind = str(node["id"]), node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if not kind.startswith(PACK_PREFIX):
            continue  # ComfyUI's own nodes are checked by the server when the page queues the prompt
        saved, shown = node.get("widgets_values") or [], loaded[node_id]["widgets_values"] or []
        assert shown == saved, (
            f"{where}: node {node_id} ({kind}) widget values changed on load: file {saved}, frontend {shown}"
        )
        info = server.get(f"/object_info/{kind}")[kind]  # now: file lists change as workflows run
        values = dict(zip(_widget_names(info), saved))
        problems = limit_problems(info, values)
        assert not problems, f"{where}: node {node_id} ({kind}): " + "; ".join(problems)

    # Queue it from the page, at a small size: the same overrides as the server-side workflow test.
    prompt = ui_to_api(workflow, server.object_info)
    width, height = preset_size(prompt)
    small = small_prompt(json.loads(json.dumps(prompt)), width, height)
    changes = {}
    for node_id, node in small.items():
        diff = {k: v for k, v in node["inputs"].items() if not isinstance(v, list) and prompt[node_id]["inputs"].get(k) != v}
        if diff:
            changes[node_id] = diff
    missing = page.evaluate(SET_WIDGETS, changes)
    assert not missing, f"{where}: widgets not found on the page: {missing}"
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                              timeout=60_000) as response:
        page.evaluate("() => window.app.queuePrompt(0, 1)")
    reply = response.value
    body = reply.json()
    assert reply.status == 200, f"{where}: ComfyUI refused the prompt queued from the page: {json.dumps(body)[:3000]}"
    entry = server.wait(body["prompt_id"])
    assert entry["status"].get("status_str") == "success", f"{where}: the queued prompt failed: {execution_error(entry)}"
    images = server.output_files(entry, "images")
    batch = max([n["inputs"].get("batch_size", 1) for n in small.values() if n["class_type"] == "LuminaEmptyLatent"]
                or [1])
    assert len(images) == batch, f"{where}: {len(images)} images saved, expected {batch}"
    for path in images:
        assert png_size(path) == (width, height)
    notices = page.evaluate(ERROR_NOTICES)
    assert not notices, f"{where}: the frontend shows errors after the run: {notices}"
    errors = browser_page.take_errors()
    assert not errors, f"{where}: console errors while running: {errors}"
