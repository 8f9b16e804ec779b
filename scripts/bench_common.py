"""What the PyTorch benchmark scripts share: where the default model is, loading it in PyTorch +
transformers the same way on every side-by-side run, and writing the report."""
import os
import sys


def model_location():
    """(folder, file name) of the default model, as scripts/fetch-model.sh leaves it."""
    home = os.environ.get("CARTRIDGE_HOME", os.path.expanduser("~/.cache/cartridge"))
    return os.path.join(home, "models"), "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_pytorch_model():
    """(torch, model): the default GGUF dequantised to f32, in eval mode, on all cores; None
    (with a note on stderr) when torch or transformers is missing."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"PyTorch column skipped: {e}", file=sys.stderr)
        return None
    torch.set_num_threads(os.cpu_count() or 2)
    model_dir, model_file = model_location()
    m = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, torch_dtype=torch.float32)
    m.eval()
    return torch, m


def write_report(text, out=None):
    """Print the markdown report, and also write it to `out` when given."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
