from .paged_cache import BeamPages, PagedKVCache, RouteFlag

__all__ = ["BeamPages", "PagedKVCache", "RouteFlag"]
