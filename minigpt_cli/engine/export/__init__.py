"""`minigpt export`: a finished run as files another program loads, every input checked first.

Where each piece lives: `run.export_run` is the verb's entry (format, output path and run checked
first, then one writer); `source` opens what is exported (a finished run, a LoRA run merged into
plain weights); `output` writes into a temporary folder beside the destination and renames it into
place, so an export is whole or absent; `hf` writes a Hugging Face transformers folder, with
`hf_tokenizer` for the tokenizer files and the chat template; `gguf_file` writes one GGUF file for
llama.cpp, with `ollama` for the Modelfile beside it. A new format is one writer module and one
entry in `run.FORMATS`. Nothing is imported here.

`minigpt import` is the way back, here because it shares the folder handling (`output`) and the
tokenizer's Hugging Face form (`hf_tokenizer`): `hf_import.import_hf` is its entry,
`hf_checkpoint` reads and checks a Hugging Face folder, `hf_tokenizer_import` makes its tokenizer
a minigpt one (through `data.sp_model`, sentencepiece's file format without the protobuf
package).
"""
