"""Export the CLIP of a training checkpoint (work/clip/checkpoints/step-N) as image_encoder/ + image_processor/."""
import sys, shutil
from pathlib import Path
from safetensors.torch import load_file
from transformers import CLIPVisionModelWithProjection, CLIPVisionConfig
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_file(str(ckpt / "model.safetensors"))
ref = Path("models/miniworld")
vision = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(ref / "image_encoder"))
sub = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.vision_model.") or k.startswith("clip.visual_projection.")}
missing = vision.load_state_dict(sub, strict=False)
print("missing", missing.missing_keys[:5], "unexpected", missing.unexpected_keys[:5])
vision.save_pretrained(out / "image_encoder")
shutil.copytree(ref / "image_processor", out / "image_processor", dirs_exist_ok=True)
