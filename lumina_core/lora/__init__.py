"""LoRAs for the three Lumina DiTs: the key forms people share (PEFT/diffusers, original names, kohya; SPEC.md §11)
matched to the model's original parameter names (`names`, `plan`), applied to the core's modules and removed again
bit for bit (`apply`), and rewritten in the original-name form ComfyUI's own loader reads (`convert`)."""

from .apply import LoraReport, apply_lora, loaded_loras, remove_lora
from .convert import convert_lora
from .plan import LoraError, LoraFamilyError, plan_lora, read_lora

__all__ = ["LoraError", "LoraFamilyError", "LoraReport", "apply_lora", "convert_lora", "loaded_loras", "plan_lora",
           "read_lora", "remove_lora"]
