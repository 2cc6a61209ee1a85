"""Test stand-in for the official ``slicegpt.adapters`` package (microsoft/TransformerCompression).

One module per family the official package serves, with the official module and class names:
``llama_adapter`` (Llama-2 / Llama-3), ``opt_adapter`` (OPT), ``phi2_adapter`` (Phi-2) and
``phi3_adapter`` (Phi-3-mini-4k). Importing ``slicegpt`` registers them all, so
``ModelAdapter.from_model`` can pick one by model name.
"""
