"""A model with its optimizers, as the training loop builds them, for tests that take steps."""
import torch

from fastsynth import fast
from fastsynth.engine import precision
from fastsynth.model import SynthSSL


def built(cfg, plan, device=torch.device("cpu"), **model_kw):
    """(model in train mode, SGD, Adam or None, autocast factory, trainable params), the model
    initialised from seed 0 and given the plan's layout (fast.prepare) on `device`."""
    torch.manual_seed(0)
    model = SynthSSL(cfg, **model_kw).to(device)
    fast.prepare(model, plan)
    opt, dec_opt = fast.optimizers(model, cfg, plan)
    autocast, _ = precision(cfg, device)
    model.train()
    return model, opt, dec_opt, autocast, [p for p in model.parameters() if p.requires_grad]
