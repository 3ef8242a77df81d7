from .kv_pool import KVPool
from .paged_cache import BeamPages, PagedKVCache, RouteFlag

__all__ = ["BeamPages", "KVPool", "PagedKVCache", "RouteFlag"]
