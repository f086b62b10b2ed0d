"""The IterIS nodes in a real ComfyUI 0.3.75 server: listed, merging, saving, loading, cancel."""

import json
import threading
import time
from pathlib import Path

import pytest
from comfy_harness import CUSTOM_NODE_NAME, ComfyError, loader_warnings
from comfy_harness import TEST_CHECKPOINT_NAME as CKPT
from safetensors import safe_open

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example_workflows" / "IterIS - merge two LoRAs and compare.json"
NODES = ("IterIS_LoraEntry", "IterIS_Merge", "IterIS_SaveLora", "IterIS_CompareGrid")
PROMPTS_A, PROMPTS_B = "a photo of sks dog", "a zwx style painting\na zwx style castle"


def merge_graph(loras, seed, *, iterations=1, steps=3, resolution=64, method="iteris", save_as=None, overwrite=False):
    """API-format graph: checkpoint -> two LoRA entries -> merge (-> save)."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "a": {"class_type": "IterIS_LoraEntry", "inputs": {"lora_name": loras[0], "strength": 1.0, "prompts": PROMPTS_A}},
        "b": {"class_type": "IterIS_LoraEntry",
              "inputs": {"lora_name": loras[1], "strength": 0.8, "prompts": PROMPTS_B, "previous": ["a", 0]}},
        "merge": {"class_type": "IterIS_Merge", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "loras": ["b", 0], "method": method,
            "iterations": iterations, "rank": 0, "sampler": "euler", "scheduler": "normal", "steps": steps,
            "timesteps": 2, "resolution": resolution, "cfg": 4.0, "calibration_seed": seed}},
    }
    if save_as is None:  # an output node, so ComfyUI runs the merge
        g["chart"] = {"class_type": "PreviewImage", "inputs": {"images": ["merge", 4]}}
    else:
        g["save"] = {"class_type": "IterIS_SaveLora",
                     "inputs": {"lora": ["merge", 2], "filename": save_as, "dtype": "fp16", "overwrite": overwrite}}
    return g


def sample_nodes(g, model, clip, seed, prefix):
    """Add text encodes, a 64 px KSampler and SaveImage fed by ``model`` / ``clip``."""
    g |= {
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": clip}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "image": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    return g


def test_nodes_are_listed_with_tooltips(comfy_server, comfy_lora_pair):
    info = comfy_server.object_info()
    for node in NODES:
        assert node in info, f"{node} missing; server log:\n{comfy_server.log_tail()}"
        spec = info[node]["input"]
        for group in ("required", "optional"):
            for name, (_, options) in spec.get(group, {}).items():
                assert options.get("tooltip"), f"{node}.{name} has no tooltip"
    assert set(comfy_lora_pair) <= set(info["IterIS_LoraEntry"]["input"]["required"]["lora_name"][1]["options"])
    assert "iteris" in info["IterIS_Merge"]["input"]["required"]["method"][1]["options"]
    assert info["IterIS_Merge"]["output"] == ["MODEL", "CLIP", "LORA_MODEL", "STRING", "IMAGE"]


def test_merge_save_and_load_with_core_lora_loader(comfy_server, comfy_lora_pair):
    loras_dir = comfy_server.models_dir / "loras"
    g = merge_graph(comfy_lora_pair, seed=11, save_as="merged_11")
    sample_nodes(g, ["merge", 0], ["merge", 1], seed=5, prefix="merged_model")  # the MODEL/CLIP outputs sample
    mark = comfy_server.log_mark()
    entry = comfy_server.run(g, timeout=900)
    assert loader_warnings(comfy_server.log_text(since=mark)) == []
    report = entry["outputs"]["merge"]["text"][0]
    assert report.startswith("iteris: error per LoRA") and "kept" in report.splitlines()[0]
    # each LoRA's calibration error (0 = the merge acts exactly like that LoRA alone on its
    # prompts, 1 = as if it were absent), a line each: the merged LoRA does what each input did
    rows = {line.split()[0]: line.split()[1] for line in report.splitlines()[1:3]}
    assert list(rows) == list(comfy_lora_pair), report
    errors = [float(e) for e in rows.values()]
    assert all(0 <= e < 0.9 for e in errors), report
    assert len(comfy_server.output_files(entry)) == 1
    saved = loras_dir / "merged_11.safetensors"
    assert entry["outputs"]["save"]["text"] == [f"saved merged_11.safetensors in models/loras:\n{saved.resolve()}"]
    with safe_open(str(saved), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert [m["name"] for m in json.loads(meta["merged_from"])] == list(comfy_lora_pair)
    assert json.loads(meta["iteris_recipe"])["method"] == "iteris"
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert not list(loras_dir.glob("*.tmp*"))

    # the saved file through ComfyUI's own LoraLoader: every key loads, and sampling completes
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                         "lora_name": saved.name, "strength_model": 1.0, "strength_clip": 1.0}}}
    sample_nodes(g, ["lora", 0], ["lora", 1], seed=6, prefix="saved_lora")
    mark = comfy_server.log_mark()
    entry = comfy_server.run(g, timeout=300)
    log = comfy_server.log_text(since=mark)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log
    assert len(comfy_server.output_files(entry)) == 1

    # saving again under the same name is refused, and the file is left as it was
    before = saved.read_bytes()
    again = merge_graph(comfy_lora_pair, seed=11, save_as="merged_11")
    again["save"]["inputs"]["dtype"] = "fp32"  # a changed input, so ComfyUI runs the save again
    with pytest.raises(ComfyError, match="already exists"):
        comfy_server.run(again, timeout=900)
    assert saved.read_bytes() == before


def test_lora_model_output_feeds_core_load_lora_model(comfy_server, comfy_lora_pair):
    # the widget's largest seed: each prompt's trajectory seed (seed + 1009 concept + prompt) is folded
    g = merge_graph(comfy_lora_pair, seed=0xFFFFFFFFFFFFFFFF, iterations=0, method="regmean")
    g["apply"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["ckpt", 0], "lora": ["merge", 2], "strength_model": 1.0}}
    sample_nodes(g, ["apply", 0], ["ckpt", 1], seed=7, prefix="lora_model")
    mark = comfy_server.log_mark()
    entry = comfy_server.run(g, timeout=900)
    log = comfy_server.log_text(since=mark)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log
    assert [p.name for p in comfy_server.output_files(entry) if p.name.startswith("lora_model")]


def test_save_refuses_names_outside_the_loras_folder(comfy_server, comfy_lora_pair):
    for k, bad in enumerate(("../escaped", "/tmp/escaped_abs", "sub/../../escaped2")):
        with pytest.raises(ComfyError, match="models/loras"):
            comfy_server.run(merge_graph(comfy_lora_pair, seed=20 + k, iterations=0, method="linear", save_as=bad), timeout=900)
    assert not (comfy_server.models_dir / "escaped.safetensors").exists()
    assert not Path("/tmp/escaped_abs.safetensors").exists()
    assert not (comfy_server.models_dir / "escaped2.safetensors").exists()


def test_cancel_stops_the_merge_and_leaves_no_file(comfy_server, comfy_lora_pair):
    loras_dir = comfy_server.models_dir / "loras"
    prompt_id = comfy_server.post(merge_graph(comfy_lora_pair, seed=31, iterations=40, steps=6, save_as="cancelled"))
    started = time.monotonic()
    while not comfy_server.queue().get("queue_running"):
        if time.monotonic() - started > 120:
            pytest.fail("the merge never started")
        time.sleep(0.2)
    time.sleep(5)  # well inside the merge: the checkpoint is cached by earlier tests
    comfy_server.interrupt()
    t0 = time.monotonic()
    with pytest.raises(ComfyError) as err:
        comfy_server.wait(prompt_id, timeout=300)
    assert err.value.interrupted, str(err.value)
    assert time.monotonic() - t0 < 60
    assert not list(loras_dir.glob("cancelled*"))


def test_example_workflow_runs(comfy_server, comfy_lora_pair):
    workflow = json.loads(EXAMPLE.read_text())
    info = comfy_server.object_info()
    for name in {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"}:
        comfy_server.add_model("checkpoints", comfy_server.models_dir / "checkpoints" / CKPT, name)
    prompt = ui_to_api(workflow, info)
    # The graph runs as shipped (nodes, links, LoRA names, prompts, methods); only its sizes are
    # scaled down, because 512 px and 20 steps for the grid's 15 pictures take most of an hour on 2 CPU cores.
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs |= {"width": 64, "height": 64}
        elif node["class_type"] == "KSampler":
            inputs |= {"steps": 2}
        elif node["class_type"] == "IterIS_Merge":
            inputs |= {"resolution": 64, "steps": 3, "timesteps": 2, "iterations": 1}
        elif node["class_type"] == "IterIS_CompareGrid":
            inputs |= {"width": 64, "height": 64, "steps": 2}
    entry = comfy_server.run(prompt, timeout=1800)
    from PIL import Image

    sizes = [Image.open(p).size for p in comfy_server.output_files(entry)]
    assert len(sizes) == 2 and (640, 400) in sizes  # the convergence chart and one picture grid
    sizes.remove((640, 400))
    # the grid: 3 prompts x 5 models of 64 px, 8 px apart, with room for the labels
    (width, height), = sizes
    assert width > 3 * (64 + 8) and height > 5 * (64 + 8)
    assert (comfy_server.models_dir / "loras" / "iteris_merged.safetensors").is_file()


def ui_to_api(workflow: dict, info: dict) -> dict:
    """ComfyUI's UI workflow format -> the API format /prompt takes, using /object_info for
    each node's input order (widget values fill the inputs that have no link, in order; an
    input flagged control_after_generate is followed by that control's value)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):  # the frontend's own, never sent to the server
            continue
        spec = info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for group in ("required", "optional"):
            for name in spec["input_order"].get(group, []):
                typ, options = (spec["input"][group][name] + [{}])[:2]
                is_widget = isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if name in linked:
                    link = linked[name]
                    inputs[name] = [str(link[1]), link[2]]
                if is_widget:
                    value = next(values, None)
                    if name not in linked and value is not None:
                        inputs[name] = value
                    if options.get("control_after_generate"):
                        next(values, None)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_progress_messages_reach_the_front_end(comfy_server, comfy_lora_pair):
    """The node's live "iteris.progress" messages arrive over ComfyUI's websocket."""
    import asyncio

    import aiohttp

    events = []

    async def listen(ready: threading.Event, done: threading.Event):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{comfy_server.url}/ws?clientId={comfy_server.client_id}") as ws:
                ready.set()
                while not done.is_set():
                    try:
                        msg = await ws.receive(timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "iteris.progress":
                            events.append(data["data"])

    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(listen(ready, done)), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        comfy_server.run(merge_graph(comfy_lora_pair, seed=41, iterations=1), timeout=900)
        time.sleep(1.0)
    finally:
        done.set()
        thread.join(10)
    phases = {e["phase"] for e in events}
    assert {"iterate", "done"} <= phases, phases
    final = [e for e in events if e["phase"] == "done"][-1]
    assert len(final["history"]) == 2 and len(final["history"][0]) == 2
    assert final["concepts"] == list(comfy_lora_pair)


def test_front_end_extension_and_help_pages_are_served(comfy_server):
    scripts = comfy_server.get("/extensions")
    ours = [s for s in scripts if s.endswith("/iteris.js")]
    assert ours, scripts
    for node in NODES:  # the help pages, as the front end fetches them
        page = comfy_server.get(f"/extensions/{CUSTOM_NODE_NAME}/docs/{node}.md")
        assert page == (REPO / "web" / "docs" / f"{node}.md").read_text()


def test_bad_lora_files_fail_with_one_line_naming_the_file(comfy_server, comfy_lora_pair, tmp_path):
    """In the server: a pickle LoRA is refused unopened, a LoRA for another model family names
    its unmatched keys; neither leaves a file or a patched model."""
    import pickle

    import torch
    from safetensors.torch import save_file

    loras = comfy_server.models_dir / "loras"
    marker = tmp_path / "unpickled"
    (loras / "evil.pt").write_bytes(pickle.dumps(_Marker(str(marker))))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)},
              str(loras / "flux_style.safetensors"))
    for name, message in (("evil.pt", "only .safetensors"), ("flux_style.safetensors", "match no module")):
        g = merge_graph(comfy_lora_pair, seed=50, iterations=0, method="linear", save_as="never_written")
        g["a"]["inputs"]["lora_name"] = name
        with pytest.raises(ComfyError, match=message) as err:
            comfy_server.run(g, timeout=300)
        summary = str(err.value).splitlines()[0]
        assert name in summary, summary
    assert not marker.exists()
    assert not list(loras.glob("never_written*"))


class _Marker:
    """Unpickling this creates a file: proof that a file was (or was not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
