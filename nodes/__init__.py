"""ComfyUI face of the pack: the only package that imports ComfyUI's node API."""
from comfy_api.latest import ComfyExtension, io

from .deepcache import OptimDeepCache
from .device_placement import OptimDevicePlacement
from .ditcache import OptimDiTCache, OptimDiTCacheConfig, OptimDiTCacheLoad, OptimDiTCacheSearch
from .group_offload import OptimGroupOffload, OptimGroupOffloadCLIP, OptimGroupOffloadVAE
from .layerwise_cast import OptimLayerwiseCast, OptimLayerwiseCastCLIP
from .noop import OptimNoop
from .sharded import OptimLoadShardedModel, OptimSaveModelShards
from .speed import OptimAttentionBackend, OptimChannelsLast
from .tgate import OptimTGate
from .vae import OptimVAE

NODES: list[type[io.ComfyNode]] = [
    OptimNoop, OptimDeepCache, OptimTGate, OptimDiTCache, OptimDiTCacheSearch, OptimDiTCacheLoad, OptimDiTCacheConfig,
    OptimGroupOffload, OptimGroupOffloadVAE, OptimGroupOffloadCLIP, OptimDevicePlacement,
    OptimLoadShardedModel, OptimSaveModelShards,
    OptimLayerwiseCast, OptimLayerwiseCastCLIP, OptimVAE, OptimAttentionBackend, OptimChannelsLast]


class OptimExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> OptimExtension:
    return OptimExtension()
