"""A check both reference-model test files make: sampled images read back as their prompts."""
import torch

from bench.reference import adherence as ad


def assert_follows_prompts(model, prompts):
    """Images sampled from `model` (a reference model) read back as their prompts (>= 60% of the
    attributes), and clearly better than against the prompts shifted by one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: a second OpenMP thread only waits (20x slower on a busy CPU)
    try:
        images = [model.sample(p, seed=i)[0].numpy() for i, p in enumerate(prompts)]
    finally:
        torch.set_num_threads(threads)
    result = ad.adherence(images, prompts)
    assert result["adherence"] >= 0.6, result
    # a prompt's image does not fit the other prompts as well as its own
    shuffled = ad.adherence(images, prompts[1:] + prompts[:1])
    assert shuffled["adherence"] < result["adherence"] - 0.15, (result, shuffled)
