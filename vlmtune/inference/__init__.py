"""Inference with what training wrote: load (a merged model, or base + adapter), prompts (one question or a data
file, read as training reads it), generation (tokenized as in training, batched), run (`predict`), outputs (--out), retrieval
(`predict --retrieve`: an image index's top-k images for the question)."""

from .generation import encode, generate, model_inputs
from .load import Loaded, load_for_inference
from .outputs import PredictionFile, write_jsonl
from .prompts import Prompt, read_prompts, single_prompt
from .retrieval import Retrieved, retrieve
from .run import exact_matches, predict

__all__ = ["Loaded", "Prompt", "PredictionFile", "encode", "exact_matches", "generate", "load_for_inference",
           "model_inputs", "predict", "read_prompts", "retrieve", "Retrieved", "single_prompt", "write_jsonl"]
