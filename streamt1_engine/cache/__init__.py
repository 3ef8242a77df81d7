from .block_pool import BlockPool, RouteFlag
from .kv_pool import KVPool
from .paged_cache import BeamPages, PagedKVCache, page_tokens_for

__all__ = ["BeamPages", "BlockPool", "KVPool", "PagedKVCache", "RouteFlag", "page_tokens_for"]
