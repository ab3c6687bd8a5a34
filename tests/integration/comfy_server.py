"""A real ComfyUI server for the integration and web-page tests: started once per test module, with the pack linked
into its custom_nodes and a tiny models tree written by the tests.

ComfyUI is found through two environment variables:

- COMFYUI_DIR: a ComfyUI checkout (the folder holding main.py);
- COMFYUI_PYTHON: the python of an environment that runs it.

Unset, the tests that need them are skipped with a reason naming both. Set but broken (no main.py, a python that
cannot start the server, the pack failing to import), they fail with the server log's tail: they never skip then.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import (  # noqa: E402
    FLUX_VAE_NAME,
    FLUX_VAE_SCRIPT,
    REPO,
    VAE_NAME,
    VAE_SCRIPT,
    make_tiny_models,
)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON")
INPUT_IMAGE = "lumina_test.png"
PACK_DIR_NAME = "ComfyUI-Lumina"
# ComfyUI logs "Cannot import <path> module for custom nodes: <error>" and "<s> seconds (IMPORT FAILED): <path>".
PACK_IMPORT_FAILED = re.compile(rf"(Cannot import \S*{PACK_DIR_NAME}\b|IMPORT FAILED\): \S*{PACK_DIR_NAME}\b)")
SMALL_STEPS = 3

requires_comfyui = pytest.mark.skipif(
    not (COMFYUI_DIR or COMFYUI_PYTHON),
    reason="set COMFYUI_DIR (a ComfyUI checkout, the folder with main.py) and COMFYUI_PYTHON (the python that runs "
    "it) to run the real-ComfyUI tests; `eval \"$(bash ../shared/comfyui/install_comfyui.sh /tmp/comfyui)\"` sets "
    "both",
)

INPUT_SCRIPT = r"""
import sys
from PIL import Image
Image.new("RGB", (96, 80), (200, 120, 40)).save(sys.argv[1])
"""


def check_comfyui_env() -> None:
    """Fail (never skip) when ComfyUI was asked for but the variables do not name a usable one."""
    problems = []
    if not COMFYUI_DIR or not os.path.isfile(os.path.join(COMFYUI_DIR, "main.py")):
        problems.append(f"COMFYUI_DIR={COMFYUI_DIR!r} is not a ComfyUI checkout (no main.py in it)")
    if not COMFYUI_PYTHON or not os.access(COMFYUI_PYTHON, os.X_OK):
        problems.append(f"COMFYUI_PYTHON={COMFYUI_PYTHON!r} is not an executable python")
    if problems:
        pytest.fail("; ".join(problems) + ". Unset both to skip the real-ComfyUI tests.", pytrace=False)


def run_check_script(script: Path, name: str, out_dir: Path, timeout: int = 1800) -> dict:
    """Run the check `name` of a comfy_*_checks.py script in ComfyUI's python (no server; the checkout as the working
    directory) and return the measurements of its last `RESULT {json}` line; fails with its output otherwise."""
    check_comfyui_env()
    result = subprocess.run([COMFYUI_PYTHON, str(script), name, str(out_dir)], cwd=COMFYUI_DIR,
                            capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


class Server:
    """A ComfyUI server started for the tests, with the pack linked into custom_nodes and a tiny models tree."""

    def __init__(self, base: Path):
        self.base = base
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc = None
        self.object_info: dict = {}

    def start(self, timeout=300):
        cmd = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
        self.log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        except OSError as e:
            pytest.fail(f"could not start ComfyUI with {COMFYUI_PYTHON!r} in {COMFYUI_DIR!r}: {e}", pytrace=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.proc.returncode}; server log tail:\n{self.log_tail()}",
                            pytrace=False)
            try:
                self.get("/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(0.25)
        else:
            self.stop()
            pytest.fail(f"ComfyUI not ready after {timeout} s; server log tail:\n{self.log_tail()}", pytrace=False)
        if PACK_IMPORT_FAILED.search(self.log_text()):
            self.stop()
            pytest.fail(f"ComfyUI could not import the pack; server log tail:\n{self.log_tail()}", pytrace=False)
        self.object_info = self.get("/object_info", timeout=120)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict) -> str:
        status, resp = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        assert status == 200 and "prompt_id" in resp, f"prompt rejected ({status}): {json.dumps(resp)[:3000]}"
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout=600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI died:\n{self.log_tail()}"
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout=600) -> dict:
        """Queue, wait, and fail with ComfyUI's error message unless the prompt succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            pytest.fail(f"prompt failed: {execution_error(entry) or status}")
        return entry

    def output_files(self, entry: dict, key: str) -> list[Path]:
        files = []
        for ui in entry.get("outputs", {}).values():
            for item in ui.get(key, []):
                files.append(self.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
        return files


def execution_error(entry: dict) -> str:
    """ComfyUI's execution error of a history entry as 'Type: message' plus the traceback, or ''."""
    errors = [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
    if not errors:
        return ""
    e = errors[0]
    return f"{e.get('node_type')} {e.get('exception_type')}: {e.get('exception_message')}\n" + "".join(
        e.get("traceback") or [])


def start_server(base: Path) -> Server:
    """Lay out a ComfyUI base directory under `base` (tiny models of every family under the README names, a random
    SDXL-shaped VAE and a random FLUX-shaped AE, an input image), link the pack into its custom_nodes and start a
    server on it."""
    check_comfyui_env()
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    models = base / "models"
    (models / "vae").mkdir(parents=True, exist_ok=True)
    for script, target in ((VAE_SCRIPT, models / "vae" / VAE_NAME), (FLUX_VAE_SCRIPT, models / "vae" / FLUX_VAE_NAME),
                           (INPUT_SCRIPT, base / "input" / INPUT_IMAGE)):
        result = subprocess.run([COMFYUI_PYTHON, "-c", script, str(target)], cwd=COMFYUI_DIR, capture_output=True,
                                text=True)
        if result.returncode:
            pytest.fail(f"{COMFYUI_PYTHON} could not write {target.name}:\n{result.stderr[-3000:]}", pytrace=False)
    # The all-in-one lumina_2.safetensors carries the FLUX AE, as the published file does.
    paths = make_tiny_models(models, lumina_next=True, lumina2=True, flux_vae=models / "vae" / FLUX_VAE_NAME,
                             gguf=True)
    write_tiny_lumina2_lora(models / "loras" / LORA_NAME, paths["lumina2"])
    os.symlink(REPO, base / "custom_nodes" / PACK_DIR_NAME)
    server = Server(base)
    server.start()
    return server


# The LoRA the Lumina-Image-2.0 LoRA workflow loads (workflows/lumina2_lora.json).
LORA_NAME = "lumina2_lora.safetensors"


def write_tiny_lumina2_lora(path: Path, dit: Path) -> None:
    """A random diffusers-format (PEFT) LoRA for the tiny Lumina-Image-2.0 DiT at `dit`."""
    from safetensors.torch import save_file

    from lumina_core import load_dit
    from tests.helpers_lora import make_entries, spell

    path.parent.mkdir(parents=True, exist_ok=True)
    base = load_dit(dit, dtype=torch.float32)
    state = spell(make_entries("lumina2", "peft", base), "lumina2", "peft")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def load_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    data = load_file(str(path))
    assert "latent_format_version_0" in data  # ComfyUI's .latent format: raw latents, no 0.18215 rescale
    return data["latent_tensor"].float()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ComfyUI's empty-latent nodes a workflow may start from (width and height in pixels).
CORE_EMPTY_LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")


def preset_size(prompt: dict, default=(64, 64)) -> tuple[int, int]:
    """A small (width, height) with the aspect ratio of the prompt's Lumina Empty Latent preset, or of the size of
    ComfyUI's empty latent: 1/16 of it."""
    for node in prompt.values():
        if node["class_type"] == "LuminaEmptyLatent" and node["inputs"].get("resolution", "custom") != "custom":
            w, h = (int(v) for v in node["inputs"]["resolution"].split("x"))
            return w // 16, h // 16
        if node["class_type"] in CORE_EMPTY_LATENTS:
            return int(node["inputs"]["width"]) // 16, int(node["inputs"]["height"]) // 16
    return default


def small_prompt(prompt: dict, width: int, height: int) -> dict:
    """The same prompt at a small size and few steps (what a quick CPU run overrides), changed in place."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LuminaEmptyLatent":
            inputs.update(resolution="custom", width=width, height=height)
        elif kind in ("ImageScale",) + CORE_EMPTY_LATENTS:
            inputs.update(width=width, height=height)
        elif kind == "LoadImage":
            inputs["image"] = INPUT_IMAGE
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = SMALL_STEPS
    return prompt
