"""Feed-forward blocks: the classic two-layer MLP and the gated GLU family (SwiGLU, GeGLU)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU (BERT, GPT-NeoX)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,  # SwiGLU's gate (LLaMA, PaLM)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
}


class MLP(nn.Module):
    """x -> proj(act(fc(x)))."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(self.act(self.fc(x))))


class GLU(nn.Module):
    """x -> proj(act(gate(x)) * up(x)). Gate and up share one matmul (`fc`): one kernel call
    instead of two; checkpoint maps split it back into gate_proj / up_proj."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)  # rows: [gate; up]
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).split(self.hidden, dim=-1)
        return self.proj(self.dropout(self.act(gate) * up))


def build_feedforward(mlp_class: str, dim: int, hidden: int, activation: str, bias: bool, dropout: float):
    cls = {"MLP": MLP, "GLU": GLU}[mlp_class]
    return cls(dim, hidden, activation, bias=bias, dropout=dropout)
