"""Checkpoints: the HF name table and HF directories (:mod:`.hf`), our converted Orbax layout
(:mod:`.orbax`), safetensors I/O (:mod:`.safetensors_io`), Meta's original release (:mod:`.meta`,
:mod:`.meta_files`), and the convert/export jobs (:mod:`.convert`)."""
