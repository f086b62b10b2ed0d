"""Writes the example workflows into example_workflows/ (ComfyUI's UI workflow format).

- "IterIS - merge two LoRAs": a checkpoint, two IterIS LoRA entries, the merge (its report and
  live chart on the node), the saved LoRA and one before/after picture (base | merged).
- "IterIS - merge two LoRAs and compare": the same merge, and one labelled picture grid (IterIS
  Compare Grid) with a row per model (base, LoRA A alone, LoRA B alone, both stacked, merged) and
  a column per prompt (one for A, one for B, one combining both), each part in a labelled group,
  with a note saying what to edit.

The file names are the titles ComfyUI's template browser shows; the .jpg beside each .json is its
card. Run it again after changing a graph below; `--thumbnails DIR` makes the .jpg cards from the
screenshots tests/test_browser.py saved in DIR (out/browser by default).
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "example_workflows"
MINIMAL, COMPARE = "IterIS - merge two LoRAs", "IterIS - merge two LoRAs and compare"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
LORA_A, LORA_B = "concept_a.safetensors", "concept_b.safetensors"
PROMPTS_A = "a photo of sks dog\na sks dog on the beach"
PROMPTS_B = "a zwx style painting of a house\na zwx style painting of a forest"
GRID_PROMPTS = ["a photo of sks dog", "a zwx style painting of a house", "a zwx style painting of sks dog"]
NEGATIVE = "blurry, low quality"
SIZE, STEPS, CFG, SEED = 512, 20, 7.0, 1000
# widget values of IterIS Merge, in its input order (the node's defaults but the resolution)
MERGE_WIDGETS = ["iteris", 2, 0, "euler", "normal", 8, 4, SIZE, 0.0, 0, "", 0.5, "0.001", "auto", "average"]
MERGE_SIZE = [520, 900]  # every widget, the chart web/iteris.js draws below them and the report for 2 LoRAs
GROUP_COLOR, EDIT_COLOR = "#3f789e", "#8a6d3b"

MODEL_OUT, CLIP_OUT = ("MODEL", "MODEL"), ("CLIP", "CLIP")
MERGE_OUT = [MODEL_OUT, CLIP_OUT, ("lora", "LORA_MODEL"), ("report", "STRING"), ("chart", "IMAGE")]


class Graph:
    def __init__(self):
        self.nodes, self.links, self.groups = [], [], []

    def add(self, type_, widgets, inputs=(), outputs=(), pos=(0, 0), size=(320, 120), title=None, widget_inputs=()):
        """inputs: [(name, type, (src_node, src_slot))]; widget_inputs: the names among them that
        feed a widget; outputs: [(name, type)]."""
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        for slot, (name, typ) in enumerate(outputs):
            node["outputs"].append({"name": name, "type": typ, "links": [], "slot_index": slot})
        self.nodes.append(node)
        for name, typ, (src, slot) in inputs:
            link_id = len(self.links) + 1
            self.links.append([link_id, src["id"], slot, node["id"], len(node["inputs"]), typ])
            src["outputs"][slot]["links"].append(link_id)
            node["inputs"].append({"name": name, "type": typ, "link": link_id}
                                  | ({"widget": {"name": name}} if name in widget_inputs else {}))
        return node

    def note(self, text, pos, size):
        return self.add("Note", [text], pos=pos, size=size, title="Read me: what to edit")

    def group(self, title, nodes, color=GROUP_COLOR):
        """A labelled frame around ``nodes`` (ComfyUI draws the title in a 34 px bar)."""
        x0 = min(n["pos"][0] for n in nodes) - 20
        y0 = min(n["pos"][1] for n in nodes) - 70
        x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 20
        y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 20
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 22, "flags": {}})

    def _boxes(self):
        return [g["bounding"] for g in self.groups] + [(*n["pos"], *n["size"]) for n in self.nodes]

    def workflow(self, scale):
        # the graph's top left corner just inside the canvas, below the frontend's menus
        offset = [80 / scale - min(x for x, _, _, _ in self._boxes()), 110 / scale - min(y for _, y, _, _ in self._boxes())]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": scale, "offset": offset}}, "version": 0.4}


def merge_part(g, y=0):
    """Checkpoint -> two IterIS LoRA entries -> Merge -> Save; returns (ckpt, merge)."""
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT], outputs=[MODEL_OUT, CLIP_OUT, ("VAE", "VAE")],
                 pos=(0, y + 390), size=(380, 100))
    g.group("1. Base model", [ckpt], EDIT_COLOR)
    a = g.add("IterIS_LoraEntry", [LORA_A, 1.0, PROMPTS_A], outputs=[("loras", "ITERIS_LORA_LIST")],
              pos=(460, y + 70), size=(420, 250), title="IterIS LoRA A")
    b = g.add("IterIS_LoraEntry", [LORA_B, 1.0, PROMPTS_B], [("previous", "ITERIS_LORA_LIST", (a, 0))],
              [("loras", "ITERIS_LORA_LIST")], pos=(460, y + 370), size=(420, 250), title="IterIS LoRA B")
    g.group("2. LoRAs to merge", [a, b], EDIT_COLOR)
    merge = g.add("IterIS_Merge", MERGE_WIDGETS,
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("loras", "ITERIS_LORA_LIST", (b, 0))],
                  MERGE_OUT, pos=(960, y + 70), size=MERGE_SIZE)
    g.group("3. Merge", [merge])
    save = g.add("IterIS_SaveLora", ["iteris_merged", "fp16", False], [("lora", "LORA_MODEL", (merge, 2))],
                 pos=(1560, y + 70), size=(420, 150))
    return ckpt, merge, save


def sample(g, model_src, clip_src, vae_src, prompt, negative, latent, pos, title, seed=SEED):
    """Positive and negative encodes (their text from string nodes), a KSampler and a decode,
    laid out from ``pos``; returns the decode."""
    x, y = pos
    enc = {"clip": ("clip", "CLIP", (clip_src, 1))}
    pos_enc = g.add("CLIPTextEncode", [""], [enc["clip"], ("text", "STRING", (prompt, 0))], [("CONDITIONING", "CONDITIONING")],
                    (x, y), (300, 90), f"{title}: prompt", widget_inputs=("text",))
    neg_enc = g.add("CLIPTextEncode", [""], [enc["clip"], ("text", "STRING", (negative, 0))], [("CONDITIONING", "CONDITIONING")],
                    (x, y + 135), (300, 90), f"{title}: negative", widget_inputs=("text",))
    ks = g.add("KSampler", [seed, "fixed", STEPS, CFG, "euler", "normal", 1.0],
               [("model", "MODEL", (model_src, 0)), ("positive", "CONDITIONING", (pos_enc, 0)),
                ("negative", "CONDITIONING", (neg_enc, 0)), ("latent_image", "LATENT", (latent, 0))],
               [("LATENT", "LATENT")], (x + 340, y), (320, 270), f"{title}: sample")
    dec = g.add("VAEDecode", [], [("samples", "LATENT", (ks, 0)), ("vae", "VAE", (vae_src, 2))], [("IMAGE", "IMAGE")],
                (x + 700, y), (220, 50), f"{title}: decode")
    return [pos_enc, neg_enc, ks, dec]


def stitch(g, first, second, direction, pos, title):
    return g.add("ImageStitch", [direction, True, 8, "white"],
                 [("image1", "IMAGE", (first, 0)), ("image2", "IMAGE", (second, 0))], [("IMAGE", "IMAGE")],
                 pos, (280, 150), title)


EDIT_FIRST = ("To use it, edit the orange groups:\n"
              "1. Base model: your checkpoint.\n"
              "2. IterIS LoRA A and B: each LoRA file and 1 to 5\n"
              "   prompts, one per line, that use it.\n")


def minimal() -> dict:
    g = Graph()
    g.note(EDIT_FIRST + "3. Merge: resolution = what the LoRAs were\n"
           "   trained at; the rest can stay.\n"
           "4. Save: the file name in models/loras.\n"
           "5. Before / after: a prompt to try.\n\n"
           "Queue it: Merge shows progress and each LoRA's\n"
           "error per iteration, then its report; Save\n"
           "shows where it wrote the file.", (0, 0), (400, 290))
    ckpt, merge, save = merge_part(g)
    prompt = g.add("PrimitiveStringMultiline", [GRID_PROMPTS[2]], outputs=[("STRING", "STRING")], pos=(0, 600),
                   size=(400, 100), title="Prompt to try")
    negative = g.add("PrimitiveStringMultiline", [NEGATIVE], outputs=[("STRING", "STRING")], pos=(0, 740),
                     size=(400, 90), title="Negative prompt")
    latent = g.add("EmptyLatentImage", [SIZE, SIZE, 1], outputs=[("LATENT", "LATENT")], pos=(0, 870), size=(400, 110))
    g.group("5. Before / after: what to try", [prompt, negative, latent], EDIT_COLOR)
    before = sample(g, ckpt, ckpt, ckpt, prompt, negative, latent, (0, 1170), "before")
    after = sample(g, merge, merge, ckpt, prompt, negative, latent, (960, 1170), "after")
    both = stitch(g, before[-1], after[-1], "right", (1920, 1170), "before | after")
    preview = g.add("PreviewImage", [], [("images", "IMAGE", (both, 0))], pos=(1560, 280), size=(420, 420),
                    title="Before (base) | after (merged)")
    g.group("4. Results", [save, preview])
    g.group("Before / after: the same prompt on the base model and on the merged one", [*before, *after, both])
    return g.workflow(scale=0.6)


def compare() -> dict:
    g = Graph()
    g.note(EDIT_FIRST + "5. Compare: the grid's prompts (a column each:\n"
           "   one for A, one for B, one for both), the\n"
           "   negative prompt, size, seed and steps.\n\n"
           "The grid (bottom right) has a row per model: base, A\n"
           "alone, B alone, both stacked, merged; and a\n"
           "column per prompt. Its labels name them.", (0, 0), (400, 290))
    ckpt, merge, save = merge_part(g)
    chart = g.add("PreviewImage", [], [("images", "IMAGE", (merge, 4))], pos=(1560, 280), size=(420, 340),
                  title="Convergence chart")
    g.group("4. The merged LoRA", [save, chart])
    entries = next(n for n in g.nodes if n.get("title") == "IterIS LoRA B")
    grid = g.add("IterIS_CompareGrid", ["\n".join(GRID_PROMPTS), NEGATIVE, SIZE, SIZE, SEED, "fixed", STEPS, CFG,
                                        "euler", "normal"],
                 [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("vae", "VAE", (ckpt, 2)),
                  ("loras", "ITERIS_LORA_LIST", (entries, 0)), ("merged_model", "MODEL", (merge, 0)),
                  ("merged_clip", "CLIP", (merge, 1))],
                 [("grid", "IMAGE")], pos=(0, 720), size=(880, 470))
    g.group("5. Compare: base, each LoRA alone, stacked, merged", [grid], EDIT_COLOR)
    out = g.add("SaveImage", ["iteris_grid"], [("images", "IMAGE", (grid, 0))], pos=(1560, 720), size=(420, 470),
                title="The grid: a row per model, a column per prompt")
    g.group("6. The grid", [out])
    return g.workflow(scale=0.65)


def thumbnails(folder: Path) -> None:
    from PIL import Image

    for name in (MINIMAL, COMPARE):
        shot = folder / f"{name}.png"
        if not shot.is_file():
            sys.exit(f"{shot}: no screenshot; run tests/test_browser.py first")
        image = Image.open(shot).convert("RGB")
        image.thumbnail((640, 400))
        image.save(OUT / f"{name}.jpg", quality=85)
        print(OUT / f"{name}.jpg")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--thumbnails"]:
        thumbnails(Path(sys.argv[2] if len(sys.argv) > 2 else "out/browser"))
    else:
        for name, build in ((MINIMAL, minimal), (COMPARE, compare)):
            path = OUT / f"{name}.json"
            path.write_text(json.dumps(build(), indent=1) + "\n")
            print(path)
