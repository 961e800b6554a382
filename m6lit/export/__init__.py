"""`m6lit export`: a Lightning checkpoint → a Hugging Face folder that loads with transformers alone.

One idea per file: `checkpoint` reads the checkpoint, `card` writes the model card, `folder` writes the folder
atomically and pushes it to the Hub, `command` checks the inputs and runs it all (`m6lit export`). The way back
into m6lit (`model.init_from`) is model code: `m6lit.model.exported_weights`.
"""

from m6lit.export.card import LORA_DENSE_FFN_TARGETS, LORA_TARGETS, NO_METRICS, PIPELINE_TAG, model_card
from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint, training_record
from m6lit.export.command import export_checkpoint, export_tokenizer, main
from m6lit.export.errors import ExportError
from m6lit.export.folder import push_folder, write_export

__all__ = ["ExportError", "LORA_DENSE_FFN_TARGETS", "LORA_TARGETS", "NO_METRICS", "PIPELINE_TAG", "export_checkpoint",
           "export_tokenizer", "load_checkpoint", "main", "model_card", "model_from_checkpoint", "push_folder",
           "training_record", "write_export"]
