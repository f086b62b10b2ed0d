"""Writes example_workflows/iteris_merge_two_loras.json (ComfyUI's UI workflow format).

The graph: a checkpoint, two LoRAs merged with IterIS (saved, charted), and a comparison grid:
rows base / LoRA A alone / LoRA B alone / both stacked / merged, columns a prompt for A, one for
B, and one combining both. Run it again after changing the graph below.
"""

import json
from pathlib import Path

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
LORA_A, LORA_B = "concept_a.safetensors", "concept_b.safetensors"
PROMPTS_A = "a photo of sks dog\na sks dog on the beach"
PROMPTS_B = "a zwx style painting of a house\na zwx style painting of a forest"
GRID_PROMPTS = ["a photo of sks dog", "a zwx style painting of a house", "a zwx style painting of sks dog"]
NEGATIVE = "blurry, low quality"
SIZE, STEPS, CFG = 512, 20, 7.0


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets, inputs=(), outputs=(), x=0, y=0):
        """inputs: [(name, type, (src_node, src_slot))]; outputs: [(name, type)]."""
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [x, y], "size": [320, 120], "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        for slot, (name, typ) in enumerate(outputs):
            node["outputs"].append({"name": name, "type": typ, "links": [], "slot_index": slot})
        self.nodes.append(node)
        for name, typ, (src, slot) in inputs:
            link_id = len(self.links) + 1
            self.links.append([link_id, src["id"], slot, node["id"], len(node["inputs"]), typ])
            src["outputs"][slot]["links"].append(link_id)
            node["inputs"].append({"name": name, "type": typ, "link": link_id})
        return node

    def workflow(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def build() -> dict:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", [CHECKPOINT], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    a = g.add("IterIS_LoraEntry", [LORA_A, 1.0, PROMPTS_A], outputs=[("loras", "ITERIS_LORA_LIST")], x=400)
    b = g.add("IterIS_LoraEntry", [LORA_B, 1.0, PROMPTS_B], [("previous", "ITERIS_LORA_LIST", (a, 0))],
              [("loras", "ITERIS_LORA_LIST")], x=400, y=250)
    merge = g.add("IterIS_Merge", ["iteris", 5, 0, "euler", "normal", 8, 4, SIZE, 5.0, 0, "", 0.5, 0.1, "auto", "sum"],
                  [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("loras", "ITERIS_LORA_LIST", (b, 0))],
                  [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("lora", "LORA_MODEL"), ("report", "STRING"), ("chart", "IMAGE")], x=800)
    g.add("IterIS_SaveLora", ["iteris_merged", "fp16", False], [("lora", "LORA_MODEL", (merge, 2))], x=1200)
    g.add("PreviewImage", [], [("images", "IMAGE", (merge, 4))], x=1200, y=200)
    loader_out = [("MODEL", "MODEL"), ("CLIP", "CLIP")]
    only_a = g.add("LoraLoader", [LORA_A, 1.0, 1.0], [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1))], loader_out, y=500)
    only_b = g.add("LoraLoader", [LORA_B, 1.0, 1.0], [("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1))], loader_out, y=700)
    stacked = g.add("LoraLoader", [LORA_B, 1.0, 1.0], [("model", "MODEL", (only_a, 0)), ("clip", "CLIP", (only_a, 1))], loader_out, y=900)
    latent = g.add("EmptyLatentImage", [SIZE, SIZE, 1], outputs=[("LATENT", "LATENT")], y=1100)
    rows = [("base", ckpt), ("lora_a", only_a), ("lora_b", only_b), ("stacked", stacked), ("merged", merge)]
    grid = None
    for r, (name, src) in enumerate(rows):
        x, y = 1600, 400 * r
        neg = g.add("CLIPTextEncode", [NEGATIVE], [("clip", "CLIP", (src, 1))], [("CONDITIONING", "CONDITIONING")], x, y)
        row = None
        for c, prompt in enumerate(GRID_PROMPTS):
            pos = g.add("CLIPTextEncode", [prompt], [("clip", "CLIP", (src, 1))], [("CONDITIONING", "CONDITIONING")], x + 350 * c, y + 120)
            sample = g.add("KSampler", [1000 + c, "fixed", STEPS, CFG, "euler", "normal", 1.0],
                           [("model", "MODEL", (src, 0)), ("positive", "CONDITIONING", (pos, 0)),
                            ("negative", "CONDITIONING", (neg, 0)), ("latent_image", "LATENT", (latent, 0))],
                           [("LATENT", "LATENT")], x + 350 * c, y + 200)
            image = g.add("VAEDecode", [], [("samples", "LATENT", (sample, 0)), ("vae", "VAE", (ckpt, 2))],
                          [("IMAGE", "IMAGE")], x + 350 * c, y + 320)
            row = image if row is None else g.add("ImageBatch", [], [("image1", "IMAGE", (row, 0)), ("image2", "IMAGE", (image, 0))],
                                                  [("IMAGE", "IMAGE")], x + 1100, y + 320)
        grid = row if grid is None else g.add("ImageBatch", [], [("image1", "IMAGE", (grid, 0)), ("image2", "IMAGE", (row, 0))],
                                              [("IMAGE", "IMAGE")], x + 1400, y)
    g.add("SaveImage", ["iteris_grid"], [("images", "IMAGE", (grid, 0))], x=3200)
    return g.workflow()


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "example_workflows" / "iteris_merge_two_loras.json"
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print(out)
