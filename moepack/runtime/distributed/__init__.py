"""Pipeline-parallel inference over MLX distributed: each host runs a contiguous range of layers.

When one machine cannot hold even the dense part of a model (or serve it fast enough), ``moepack generate|serve
PACK --hosts hosts.json`` starts one process per host (``launch``: ``mlx.launch``, ring backend over TCP; MPI where
the hostfile asks for it). Every rank opens the same pack, computes the same split (``split``: pure, all
``moepack plan`` needs), and loads only its ``Stage``: its layers' dense weights and an expert pool sized for its own
MoE layers, so ``--memory-budget`` applies to each host's share. Rank 0 also holds the embeddings, the last rank the
final norm and LM head.

One forward pass (a prompt or a decoded token), ranks in a ring::

    rank 0: embed, its layers --h--> rank 1: its layers --h--> ... last rank: its layers, head --logits--> rank 0

``h`` is the hidden state the model hands from layer to layer ([1, T, H]; [1, T, streams, H] with DeepSeek V4's
hyper-connections); where layers route by token id (V4's hash-routed layers) the ids travel with it.

Rank 0 drives (it is the process that prints tokens or serves HTTP) through ``rank.PipelineEngine``, the engine
interface over the whole pipeline; the others loop in ``rank.serve_stage``, holding a KV cache per sequence rank 0 has
open. Messages (``wire``) go to ring neighbours only (all the ring backend allows): a fixed-size header that each
rank passes on before its payload, then the payload itself.

Failure: a rank that raises (a bad expert file, say) passes its error down the chain and rank 0 raises it for that
request only. A rank that dies closes its sockets and rank 0's wait fails at once; a rank that hangs, or a machine
that drops off the network, is caught by rank 0's watchdog (``timeout`` seconds per step). Either way the engine
turns unhealthy and every later call fails fast with the same :class:`PipelineError`.
"""

from moepack.runtime.distributed import launcher
from moepack.runtime.distributed.launcher import in_pipeline, launch, read_hosts, spawn_local, wait_all
from moepack.runtime.distributed.rank import (DEFAULT_TIMEOUT, PipelineEngine, RemoteError, exit_hard_if_broken, join,
                                              start)
from moepack.runtime.distributed.split import PipelineError, PipelineSplit, StageShare, split_layers, split_pack
from moepack.runtime.engine import Stage

__all__ = ["launcher", "DEFAULT_TIMEOUT", "PipelineEngine", "PipelineError", "PipelineSplit", "RemoteError", "Stage", "StageShare",
           "exit_hard_if_broken", "in_pipeline", "join", "launch", "read_hosts", "spawn_local", "split_layers",
           "split_pack", "start", "wait_all"]
