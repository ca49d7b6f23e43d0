"""A pure-Python simulator of PyTorch's CUDA caching allocator, in bytes.

Fed the allocation and free events of a program (one per storage, in program order), it replays
the decisions of ``DeviceCachingAllocator`` and reports the reserved memory that
``torch.cuda.max_memory_reserved()`` would show, with the allocated memory of
``torch.cuda.max_memory_allocated()``. No torch import: the events can come from fake tensors.

Source of every rule: ``c10/cuda/CUDACachingAllocator.cpp`` of pytorch/pytorch, read at commit
001074d2 (mid-2024, the 2.4/2.5 line), with ``c10/cuda/CUDAAllocatorConfig.{h,cpp}`` and
``c10/core/AllocatorConfig.cpp`` for the ``PYTORCH_CUDA_ALLOC_CONF`` options. The rules modelled
(rounding, pools, segment sizes, best fit, splitting, coalescing, the release and retry on a failed
cudaMalloc, garbage collection, expandable segments) are unchanged through the 2.x releases except
``max_non_split_rounding_mb`` (2.6), modelled as ``AllocatorConfig.max_non_split_rounding_size``
with its default of 20 MiB, which is the older fixed ``kLargeBuffer``. docs/allocator.md lists each
rule with its function and what is not modelled (cross-stream event recording, IPC, CUDA graph
pools, memory callbacks).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from memcalc.errors import Field, MemcalcError, SettingsError

MiB = 1 << 20

# The constants at the top of CUDACachingAllocator.cpp, under their PyTorch names in comments.
MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
SMALL_SIZE = 1 * MiB  # kSmallSize: the largest request served from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small requests are packed in 2 MiB segments
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: requests of 1-10 MiB are packed in 20 MiB segments
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: from here a request gets a segment of its own size
ROUND_LARGE = 2 * MiB  # kRoundLarge: segments of large requests are whole multiples of 2 MiB

# Expandable segments map physical memory in pages of this size (Note [Expandable Segments]).
SMALL_PAGE = SMALL_BUFFER
LARGE_PAGE = LARGE_BUFFER

# Address space of one expandable segment when no capacity is given (PyTorch reserves 1 1/8 of
# the GPU's memory, ExpandableSegment's constructor); only the order of candidates depends on it.
_DEFAULT_ADDRESS_SPACE = 1 << 48

PoolName = Literal["small", "large"]


@dataclass(frozen=True)
class Event:
    """One storage's allocation or free, in program order.

    ``size`` is the requested size in bytes, read on ``alloc`` only (a free releases whatever its
    ``block_id`` holds). A zero-byte allocation never reaches the caching allocator
    (``NativeCachingAllocator::allocate`` returns a null pointer), so it reserves nothing.
    ``stream`` is the allocation stream: a freed block is reused only by requests on the stream that
    allocated it; the stream of a free is not read."""

    kind: Literal["alloc", "free"]
    block_id: int
    size: int  # requested bytes (used on alloc)
    stream: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("alloc", "free"):
            raise ValueError(f"Event.kind must be 'alloc' or 'free', got {self.kind!r}")
        if self.size < 0:
            raise ValueError(f"Event.size must be >= 0 bytes, got {self.size}")

    @classmethod
    def alloc(cls, block_id: int, size: int, stream: int = 0) -> Event:
        return cls("alloc", block_id, size, stream)

    @classmethod
    def free(cls, block_id: int) -> Event:
        return cls("free", block_id, 0)


@dataclass(frozen=True)
class AllocatorConfig:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` options that change reserved memory, sizes in bytes.

    Checked as PyTorch's parser checks them (``AllocatorConfig::parseArgs``): the split and rounding
    sizes are whole MiB of at least 20 MiB, the threshold lies in (0, 1), divisions are powers of 2."""

    # max_split_size_mb, in bytes: blocks of at least this size are never split. None: unlimited.
    max_split_size: int | None = None
    # expandable_segments: one segment per pool and stream, grown by mapping pages.
    expandable_segments: bool = False
    # garbage_collection_threshold: fraction of the capacity above which cached blocks are freed
    # before a new segment is reserved. Acts only with a capacity (see simulate).
    garbage_collection_threshold: float | None = None
    # roundup_power2_divisions:N, the single-number form (every power-of-2 interval gets N
    # divisions). The per-interval list form "[256:1,>:4]" is not supported.
    roundup_power2_divisions: int | None = None
    # max_non_split_rounding_mb (PyTorch 2.6+), in bytes: how far an unsplittable block may exceed a
    # request of at least max_split_size and still serve it. Before 2.6 fixed at kLargeBuffer.
    max_non_split_rounding_size: int = LARGE_BUFFER

    def __post_init__(self) -> None:
        for name in ("max_split_size", "max_non_split_rounding_size"):
            value = getattr(self, name)
            if value is not None and (value < LARGE_BUFFER or value % MiB):
                raise SettingsError(Field(name), f" must be a whole number of MiB, at least 20 MiB "
                                    f"({LARGE_BUFFER} bytes), got {value} bytes")
        threshold = self.garbage_collection_threshold
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise SettingsError(Field("garbage_collection_threshold"), f" must lie in (0, 1), got {threshold}")
        divisions = self.roundup_power2_divisions
        if divisions is not None and (divisions < 1 or divisions & (divisions - 1)):
            raise SettingsError(Field("roundup_power2_divisions"), f" must be a power of 2, got {divisions}")

    @classmethod
    def from_env(cls, text: str) -> AllocatorConfig:
        """Parse a ``PYTORCH_CUDA_ALLOC_CONF`` value such as ``"max_split_size_mb:128,expandable_segments:True"``.

        Options that do not change device memory (``release_lock_on_cudamalloc``, ``pinned_*``) are
        accepted and ignored; ``backend:cudaMallocAsync`` and the list form of
        ``roundup_power2_divisions`` raise NotImplementedError."""
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.replace(" ", "").split(","))):
            key, sep, value = item.partition(":")
            if not sep or not value:
                raise SettingsError(Field(key), " needs a value, as in key:value")
            if key == "max_split_size_mb":
                values["max_split_size"] = int(value) * MiB
            elif key == "max_non_split_rounding_mb":
                values["max_non_split_rounding_size"] = int(value) * MiB
            elif key == "garbage_collection_threshold":
                values["garbage_collection_threshold"] = float(value)
            elif key == "expandable_segments":
                if value not in ("True", "False"):
                    raise SettingsError(Field("expandable_segments"), f" must be True or False, got {value!r}")
                values["expandable_segments"] = value == "True"
            elif key == "roundup_power2_divisions":
                if value.startswith("["):
                    raise NotImplementedError("roundup_power2_divisions per interval ([...]) is not simulated; "
                                              "give one number of divisions")
                values["roundup_power2_divisions"] = int(value)
            elif key == "backend":
                if value != "native":
                    raise NotImplementedError(f"backend:{value} is not simulated, only the native caching allocator")
            elif key in ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register",
                         "pinned_num_register_threads", "pinned_use_background_threads"):
                pass  # no effect on device memory
            else:
                raise SettingsError(Field(key), " is not a PYTORCH_CUDA_ALLOC_CONF option")
        return cls(**values)


@dataclass(frozen=True)
class BlockInfo:
    """One block of a segment, in address order: ``size`` bytes, in use by ``block_id`` or free."""

    size: int
    allocated: bool
    block_id: int | None = None  # the Event.block_id holding it; None when free
    requested: int = 0  # bytes the holder asked for; 0 when free


@dataclass(frozen=True)
class SegmentInfo:
    """One segment (one cudaMalloc, or one contiguous mapped range of an expandable segment, as
    ``torch.cuda.memory_snapshot()`` reports them)."""

    pool: PoolName
    stream: int
    size: int
    blocks: tuple[BlockInfo, ...]
    expandable: bool = False

    @property
    def allocated(self) -> int:
        return sum(block.size for block in self.blocks if block.allocated)


@dataclass(frozen=True)
class AllocatorStats:
    """What the simulated allocator reports, in bytes (counts are ``num_*``)."""

    peak_allocated: int  # max over time of the sizes of blocks in use (torch.cuda.max_memory_allocated)
    peak_reserved: int  # max over time of the segment sizes (torch.cuda.max_memory_reserved)
    peak_requested: int  # max over time of the bytes requested by live allocations
    final_allocated: int
    final_reserved: int
    segments: tuple[SegmentInfo, ...]  # the final layout, by address
    num_allocs: int  # allocations that reached the allocator (size > 0)
    num_frees: int
    num_device_allocs: int  # cudaMalloc calls, or page-mapping calls with expandable segments
    num_device_frees: int  # cudaFree calls, or unmapping calls
    num_alloc_retries: int  # allocations retried after freeing every cached block

    @property
    def num_segments(self) -> int:
        return len(self.segments)


class OutOfMemory(MemcalcError):
    """The simulated allocator could not reserve memory for a request within ``capacity_bytes``,
    even after releasing its cached blocks (``DeviceCachingAllocator::malloc``'s OutOfMemoryError)."""

    def __init__(self, *, event_index: int, requested_bytes: int, size_bytes: int, alloc_bytes: int,
                 reserved_bytes: int, allocated_bytes: int, capacity_bytes: int) -> None:
        self.event_index = event_index  # position of the failing alloc among the events
        self.requested_bytes = requested_bytes  # as asked
        self.size_bytes = size_bytes  # after round_size
        self.alloc_bytes = alloc_bytes  # the segment it needed ("Tried to allocate" in PyTorch)
        self.reserved_bytes = reserved_bytes  # reserved when it gave up
        self.allocated_bytes = allocated_bytes
        self.capacity_bytes = capacity_bytes
        super().__init__(
            f"simulated CUDA out of memory at event {event_index}: tried to allocate {alloc_bytes} bytes "
            f"(request of {requested_bytes} bytes); {allocated_bytes} bytes allocated, {reserved_bytes} bytes "
            f"reserved of a capacity of {capacity_bytes} bytes")


def round_size(size: int, config: AllocatorConfig = AllocatorConfig()) -> int:
    """Bytes a request of ``size`` bytes occupies: ``DeviceCachingAllocator::round_size``.

    At least 512 bytes, else a multiple of 512; with ``roundup_power2_divisions`` N > 1 and a size
    above 512 * N, the next of N equal steps between the powers of 2 around it
    (``roundup_power2_next_division``: 1200 bytes is not above 2048 so becomes 1536 with N = 4;
    5 MiB + 1 becomes 6 MiB)."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    divisions = config.roundup_power2_divisions or 0
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        return _roundup_power2_next_division(size, divisions)
    return MIN_BLOCK_SIZE * -(-size // MIN_BLOCK_SIZE)


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    power2_floor = 1 << (size.bit_length() - 1)
    step = power2_floor >> (divisions.bit_length() - 1)
    if step == 0:
        return power2_floor << 1
    floor = size & ~(step - 1)
    return size if floor == size else floor + step


def allocation_size(size: int) -> int:
    """Bytes of the segment reserved for a rounded request with no cached block to serve it:
    ``DeviceCachingAllocator::get_allocation_size``. 2 MiB up to 1 MiB, 20 MiB below 10 MiB, else the
    request rounded up to a multiple of 2 MiB."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


class _Segment:
    __slots__ = ("addr", "size", "small", "stream", "expandable", "page", "head")

    def __init__(self, addr: int, size: int, small: bool, stream: int, expandable: bool) -> None:
        self.addr = addr
        self.size = size  # bytes of the cudaMalloc, or of the address space when expandable
        self.small = small
        self.stream = stream
        self.expandable = expandable
        self.page = SMALL_PAGE if small else LARGE_PAGE
        self.head: _Block | None = None  # the block at the segment's lowest address


class _Block:
    __slots__ = ("addr", "size", "segment", "allocated", "mapped", "prev", "next", "block_id", "requested",
                 "gc_base")

    def __init__(self, addr: int, size: int, segment: _Segment, mapped: bool = True) -> None:
        self.addr = addr
        self.size = size
        self.segment = segment
        self.allocated = False
        self.mapped = mapped  # False only for the unmapped address space of an expandable segment
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.block_id: int | None = None
        self.requested = 0
        self.gc_base = 0  # the pool's get_free_block count when the block was cached (gc_count_base)

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _SortedBlocks:
    """Blocks of one pool and stream in ``(key, address)`` order: the std::set of a BlockPool, per
    stream (both of PyTorch's comparators order by stream first, so a search never leaves it)."""

    __slots__ = ("keys", "blocks", "by_size")

    def __init__(self, by_size: bool) -> None:
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[int, _Block] = {}
        self.by_size = by_size  # BlockComparatorSize (free blocks) or BlockComparatorAddress (unmapped)

    def _key(self, block: _Block) -> tuple[int, int]:
        return (block.size, block.addr) if self.by_size else (block.addr, 0)

    def add(self, block: _Block) -> None:
        bisect.insort(self.keys, self._key(block))
        self.blocks[block.addr] = block

    def remove(self, block: _Block) -> None:
        key = self._key(block)
        index = bisect.bisect_left(self.keys, key)
        if index == len(self.keys) or self.keys[index] != key:
            raise AssertionError(f"block at {block.addr} of {block.size} bytes is not in its pool")
        del self.keys[index]
        del self.blocks[block.addr]

    def lower_bound(self, size: int) -> int:
        return bisect.bisect_left(self.keys, (size, -1))

    def at(self, index: int) -> _Block:
        return self.blocks[self.keys[index][1 if self.by_size else 0]]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[_Block]:
        return (self.at(index) for index in range(len(self.keys)))


class CachingAllocator:
    """The state of one device's caching allocator, stepped one event at a time.

    ``capacity`` (bytes) is what the allocator may reserve: a cudaMalloc, or a mapping of pages,
    that would take reserved memory above it fails, as ``set_per_process_memory_fraction`` makes it
    fail in ``alloc_block``. ``None``: unlimited, so nothing cached is ever released."""

    def __init__(self, config: AllocatorConfig = AllocatorConfig(), capacity: int | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise SettingsError(Field("capacity"), f" must be >= 0 bytes, got {capacity}")
        self.config = config
        self.capacity = capacity
        self.reserved = 0  # bytes of segments (mapped pages when expandable): memory_reserved()
        self.allocated = 0  # bytes of blocks in use: memory_allocated()
        self.requested = 0  # bytes asked for by the allocations live now
        self.peak_reserved = 0
        self.peak_allocated = 0
        self.peak_requested = 0
        self.num_events = 0
        self.num_allocs = 0
        self.num_frees = 0
        self.num_device_allocs = 0
        self.num_device_frees = 0
        self.num_alloc_retries = 0
        self._live: dict[int, _Block | None] = {}
        self._free: dict[tuple[bool, int], _SortedBlocks] = {}  # (small pool?, stream): cached blocks
        self._unmapped: dict[tuple[bool, int], _SortedBlocks] = {}  # unmapped ranges of expandable segments
        self._segments: dict[int, _Segment] = {}
        self._next_addr = 0
        # BlockPool::get_free_blocks_call_count, per pool; counted only while garbage collection is on.
        self._gc_calls = {True: 0, False: 0}
        self._gc_on = capacity is not None and config.garbage_collection_threshold is not None
        if capacity is not None:
            self._address_space = capacity + capacity // 8
        else:
            self._address_space = _DEFAULT_ADDRESS_SPACE

    # -- events ----------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Replay one event; raises OutOfMemory when an allocation cannot be served."""
        if event.kind == "alloc":
            self.malloc(event.block_id, event.size, event.stream)
        else:
            self.free(event.block_id)

    def malloc(self, block_id: int, size: int, stream: int = 0) -> None:
        """Allocate ``size`` bytes for ``block_id`` on ``stream``: ``DeviceCachingAllocator::malloc``.

        Best fit in the pool's cached blocks; failing that, reserve a new segment, after garbage
        collection if it is on; if that fails, release cached oversize blocks and retry
        (``release_available_cached_blocks``), then release every unsplit cached block and retry
        (``release_cached_blocks``); then OutOfMemory."""
        index = self.num_events
        self.num_events += 1
        if block_id in self._live:
            raise ValueError(f"event {index}: block {block_id} is allocated twice without a free")
        if size < 0:
            raise ValueError(f"event {index}: size must be >= 0 bytes, got {size}")
        if size == 0:
            self._live[block_id] = None  # a null pointer: the caching allocator is not called
            return
        rounded = round_size(size, self.config)
        small = rounded <= SMALL_SIZE
        alloc_size = allocation_size(rounded)
        block = self._get_free_block(rounded, small, stream)
        if block is None:
            if self._gc_on:
                self._garbage_collect_cached_blocks()
            block = self._alloc_block(rounded, alloc_size, small, stream)
            if block is None and self._release_available_cached_blocks(rounded, small, stream):
                block = self._alloc_block(rounded, alloc_size, small, stream)
            if block is None:
                self._release_cached_blocks()
                self.num_alloc_retries += 1
                block = self._alloc_block(rounded, alloc_size, small, stream)
            if block is None:
                raise OutOfMemory(event_index=index, requested_bytes=size, size_bytes=rounded,
                                  alloc_bytes=alloc_size, reserved_bytes=self.reserved,
                                  allocated_bytes=self.allocated, capacity_bytes=self.capacity or 0)
        self._alloc_found_block(block, rounded, size, block_id, self._should_split(block, rounded))

    def free(self, block_id: int) -> None:
        """Free what ``block_id`` holds: ``DeviceCachingAllocator::free`` and ``free_block``. The block
        merges with free neighbours of its segment and goes back to its pool; nothing is returned to
        CUDA."""
        index = self.num_events
        self.num_events += 1
        if block_id not in self._live:
            raise ValueError(f"event {index}: block {block_id} is freed but not allocated")
        block = self._live.pop(block_id)
        if block is None:
            return
        self.num_frees += 1
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        block.block_id = None
        block.requested = 0
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        self._insert_free(block)

    # -- searching the cache -----------------------------------------------------------------------

    def _free_list(self, small: bool, stream: int) -> _SortedBlocks:
        key = (small, stream)
        blocks = self._free.get(key)
        if blocks is None:
            blocks = self._free[key] = _SortedBlocks(by_size=True)
        return blocks

    def _unmapped_list(self, small: bool, stream: int) -> _SortedBlocks:
        key = (small, stream)
        blocks = self._unmapped.get(key)
        if blocks is None:
            blocks = self._unmapped[key] = _SortedBlocks(by_size=False)
        return blocks

    def _insert_free(self, block: _Block) -> None:
        # BlockPool::insert_into_blocks: the block's age for garbage collection starts now.
        block.gc_base = self._gc_calls[block.segment.small]
        self._free_list(block.segment.small, block.segment.stream).add(block)

    def _get_free_block(self, size: int, small: bool, stream: int) -> _Block | None:
        """``get_free_block``: the smallest cached block of the pool and stream that holds ``size``
        (lowest address among equals), or None. A request below max_split_size takes no block of at
        least max_split_size; a request of at least max_split_size takes a block only if it is
        smaller than request + max_non_split_rounding_size. With expandable segments a block that can
        still grow into unmapped space counts as that much larger, so the search moves on to the
        next block when that one is smaller."""
        if self._gc_on:
            self._gc_calls[small] += 1
        blocks = self._free.get((small, stream))
        if not blocks:
            return None
        index = blocks.lower_bound(size)
        if index == len(blocks):
            return None
        block = blocks.at(index)
        if block.segment.expandable:
            while index + 1 < len(blocks) and _expandable_size(blocks.at(index + 1)) < _expandable_size(block):
                index += 1
                block = blocks.at(index)
        max_split = self.config.max_split_size
        if max_split is not None:
            if size < max_split and block.size >= max_split:
                return None
            if size >= max_split and block.size >= size + self.config.max_non_split_rounding_size:
                return None
        blocks.remove(block)
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """``should_split``: split off the rest of a block if it is at least 512 bytes in the small
        pool (or with expandable segments), more than 1 MiB in the large pool, and never a block
        served to a request of at least max_split_size."""
        remaining = block.size - size
        if block.segment.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK_SIZE
        max_split = self.config.max_split_size
        return (max_split is None or size < max_split) and remaining > SMALL_SIZE

    def _alloc_found_block(self, block: _Block, size: int, requested: int, block_id: int, split: bool) -> None:
        """``alloc_found_block``: the request takes the block's start; the rest stays cached."""
        if split:
            rest = block
            block = _Block(rest.addr, size, rest.segment)
            block.prev = rest.prev
            if block.prev is not None:
                block.prev.next = block
            else:
                rest.segment.head = block
            block.next = rest
            rest.prev = block
            rest.addr += size
            rest.size -= size
            self._insert_free(rest)
        block.allocated = True
        block.block_id = block_id
        block.requested = requested
        self._live[block_id] = block
        self.num_allocs += 1
        self.allocated += block.size
        self.requested += requested
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)

    def _try_merge_blocks(self, dst: _Block, src: _Block | None) -> int:
        """``try_merge_blocks``: absorb a free neighbour in the same mapping state; returns its size."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if src.mapped:
            self._free_list(src.segment.small, src.segment.stream).remove(src)
        else:
            self._unmapped_list(src.segment.small, src.segment.stream).remove(src)
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
            else:
                dst.segment.head = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    # -- reserving and releasing -------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        return self.capacity is None or self.reserved + size <= self.capacity

    def _grow_reserved(self, size: int) -> None:
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.num_device_allocs += 1

    def _alloc_block(self, size: int, alloc_size: int, small: bool, stream: int) -> _Block | None:
        """``alloc_block``: a new segment of ``alloc_size`` bytes (cudaMalloc), or with expandable
        segments the pages that make room for ``size``; None when it would exceed the capacity. The
        capacity is checked against ``alloc_size`` in both modes, as the memory-fraction check does."""
        if not self._fits(alloc_size):
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(size, small, stream)
        segment = self._new_segment(alloc_size, small, stream, expandable=False)
        block = _Block(segment.addr, alloc_size, segment)
        segment.head = block
        self._grow_reserved(alloc_size)
        return block

    def _new_segment(self, size: int, small: bool, stream: int, expandable: bool) -> _Segment:
        # Addresses only order equal-sized blocks; new segments get rising ones (real cudaMalloc
        # addresses are not monotonic: an approximation, see docs/allocator.md).
        segment = _Segment(self._next_addr, size, small, stream, expandable)
        self._next_addr += size
        self._segments[segment.addr] = segment
        return segment

    def _release_block(self, block: _Block) -> None:
        """``release_block``: cudaFree a cached block that is a whole segment."""
        if block.is_split() or block.segment.expandable:
            raise AssertionError("only a whole, non-expandable segment can be released")
        self._free_list(block.segment.small, block.segment.stream).remove(block)
        del self._segments[block.segment.addr]
        self.reserved -= block.size
        self.num_device_frees += 1

    def _release_available_cached_blocks(self, size: int, small: bool, stream: int) -> bool:
        """``release_available_cached_blocks`` (only with max_split_size): free the smallest cached
        block of the pool and stream of at least max(size, max_split_size); if there is none, free
        oversize blocks from the largest down until that many bytes are freed. True if it freed
        enough. Not tried with expandable segments, whose blocks PyTorch's release_block rejects."""
        max_split = self.config.max_split_size
        if max_split is None or self.config.expandable_segments:
            return False
        blocks = self._free.get((small, stream))
        if not blocks:
            return False
        key = max(size, max_split)
        index = blocks.lower_bound(key)
        if index < len(blocks):
            self._release_block(blocks.at(index))
            return True
        released = 0
        index -= 1
        while released < key and index >= 0 and blocks.at(index).size >= max_split:
            block = blocks.at(index)
            released += block.size
            self._release_block(block)
            index -= 1
        return released >= key

    def _release_cached_blocks(self) -> None:
        """``release_cached_blocks`` (as ``torch.cuda.empty_cache``): cudaFree every cached block that
        is a whole segment, large pool first; unmap the whole free pages of expandable segments and
        drop a segment left with nothing mapped."""
        for small in (False, True):
            for key in sorted(k for k in self._free if k[0] == small):
                to_unmap = []
                for block in list(self._free[key]):
                    if block.segment.expandable:
                        to_unmap.append(block)
                    elif not block.is_split():
                        self._release_block(block)
                for block in to_unmap:
                    self._unmap_block(block)
                    if not block.mapped and not block.is_split():
                        # release_expandable_segment
                        self._unmapped_list(small, key[1]).remove(block)
                        del self._segments[block.segment.addr]

    def _garbage_collect_cached_blocks(self) -> None:
        """``garbage_collect_cached_blocks``: when reserved exceeds threshold x capacity, free unsplit
        cached large-pool blocks, oldest first, until the excess is freed. A block's age is the number
        of large-pool searches since it was cached; each pass frees every block at least as old as the
        mean age of those left, and passes repeat until enough is freed or a pass frees nothing."""
        threshold = int(self.config.garbage_collection_threshold * self.capacity)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        calls = self._gc_calls[False]

        def freeable() -> list[_Block]:
            return [block for key in sorted(k for k in self._free if not k[0]) for block in self._free[key]
                    if not block.is_split() and not block.segment.expandable]

        candidates = freeable()
        total_age = sum(calls - block.gc_base for block in candidates)
        count = len(candidates)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            mean_age = total_age / count
            freed = False
            for block in freeable():
                age = calls - block.gc_base
                if age >= mean_age:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    count -= 1
                    self._release_block(block)

    # -- expandable segments ---------------------------------------------------------------------

    def _try_allocate_expandable_block(self, size: int, small: bool, stream: int) -> _Block | None:
        """``try_allocate_expandable_block``: find the lowest free-or-unmapped run of at least
        ``size`` bytes and map pages until the block at its start holds ``size``."""
        candidate = self._find_expandable_block(size, small, stream)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            if following is None or following.mapped:
                raise AssertionError("an expandable candidate must continue into unmapped space")
            if not self._map_block(following, min(size - candidate.size, following.size)):
                return None
            candidate = following  # map_block merged the candidate into it
        self._free_list(small, stream).remove(candidate)
        return candidate

    def _find_expandable_block(self, size: int, small: bool, stream: int) -> _Block:
        """``find_expandable_block``: the lowest unmapped range of the pool and stream (or the free
        block just before it) from which free and unmapped blocks add up to ``size``; else a new
        segment of address space."""
        unmapped = self._unmapped_list(small, stream)
        for block in unmapped:
            start = block
            if start.prev is not None and not start.prev.allocated:
                start = start.prev
            room, cursor = 0, start
            while room < size and cursor is not None and not cursor.allocated:
                room += cursor.size
                cursor = cursor.next
            if room >= size:
                return start
        page = SMALL_PAGE if small else LARGE_PAGE
        space = page * -(-self._address_space // page)
        segment = self._new_segment(space, small, stream, expandable=True)
        block = _Block(segment.addr, space, segment, mapped=False)
        segment.head = block
        unmapped.add(block)
        return block

    def _map_block(self, block: _Block, size: int) -> bool:
        """``map_block``: map the pages covering the first ``size`` bytes of an unmapped block; the
        mapped part merges with free mapped neighbours. False if the pages exceed the capacity."""
        segment = block.segment
        mapped = segment.page * -(-size // segment.page)
        if not self._fits(mapped):
            return False
        self._unmapped_list(segment.small, segment.stream).remove(block)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(block.addr + mapped, block.size - mapped, segment, mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            self._unmapped_list(segment.small, segment.stream).add(rest)
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        self._insert_free(block)
        self._grow_reserved(mapped)
        return True

    def _unmap_block(self, block: _Block) -> None:
        """``unmap_block``: unmap the whole pages inside a free mapped block; the parts of partly used
        pages before and after stay mapped and cached."""
        segment = block.segment
        offset = block.addr - segment.addr
        begin = -(-offset // segment.page)
        end = (offset + block.size) // segment.page
        if begin >= end:
            return
        free_list = self._free_list(segment.small, segment.stream)
        free_list.remove(block)
        start = segment.addr + begin * segment.page
        length = (end - begin) * segment.page
        before = start - block.addr
        after = block.size - before - length
        if before > 0:
            head = _Block(block.addr, before, segment)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            else:
                segment.head = head
            block.prev = head
            self._insert_free(head)
        if after > 0:
            tail = _Block(start + length, after, segment)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            self._insert_free(tail)
        block.addr, block.size, block.mapped = start, length, False
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        self._unmapped_list(segment.small, segment.stream).add(block)
        self.reserved -= length
        self.num_device_frees += 1

    # -- reporting --------------------------------------------------------------------------------

    def segments(self) -> tuple[SegmentInfo, ...]:
        """The layout now, by address; an expandable segment shows each contiguous mapped range."""
        result = []
        for addr in sorted(self._segments):
            segment = self._segments[addr]
            pool: PoolName = "small" if segment.small else "large"
            run: list[BlockInfo] = []
            block = segment.head
            while block is not None:
                if block.mapped:
                    run.append(BlockInfo(block.size, block.allocated, block.block_id, block.requested))
                if run and (not block.mapped or block.next is None):
                    result.append(SegmentInfo(pool, segment.stream, sum(b.size for b in run), tuple(run),
                                              segment.expandable))
                    run = []
                block = block.next
        return tuple(result)

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            peak_allocated=self.peak_allocated, peak_reserved=self.peak_reserved,
            peak_requested=self.peak_requested, final_allocated=self.allocated, final_reserved=self.reserved,
            segments=self.segments(), num_allocs=self.num_allocs, num_frees=self.num_frees,
            num_device_allocs=self.num_device_allocs, num_device_frees=self.num_device_frees,
            num_alloc_retries=self.num_alloc_retries)

    def check_invariants(self) -> None:
        """Raise AssertionError if the state is inconsistent (for tests): segments tile their range,
        links agree, no two free neighbours are left unmerged, the pools hold exactly the free
        blocks, and the byte counters match the blocks."""
        reserved = allocated = 0
        cached: set[int] = set()
        unmapped: set[int] = set()
        for segment in self._segments.values():
            block, prev, addr = segment.head, None, segment.addr
            while block is not None:
                _check(block.prev is prev and block.addr == addr and block.size > 0, "broken block links")
                _check(block.segment is segment, "block in the wrong segment")
                if prev is not None and not prev.allocated and not block.allocated:
                    _check(prev.mapped != block.mapped, "two free neighbours left unmerged")
                if block.mapped:
                    reserved += block.size
                if block.allocated:
                    _check(block.mapped and self._live.get(block.block_id) is block, "allocated block not live")
                    allocated += block.size
                elif block.mapped:
                    cached.add(id(block))
                else:
                    unmapped.add(id(block))
                addr += block.size
                prev, block = block, block.next
            _check(addr == segment.addr + segment.size, "blocks do not tile their segment")
        _check({id(b) for blocks in self._free.values() for b in blocks} == cached, "pool differs from free blocks")
        _check({id(b) for blocks in self._unmapped.values() for b in blocks} == unmapped, "unmapped set differs")
        _check(reserved == self.reserved, f"reserved {self.reserved} but segments hold {reserved}")
        _check(allocated == self.allocated, f"allocated {self.allocated} but blocks in use hold {allocated}")
        _check(self.capacity is None or self.reserved <= self.capacity, "reserved above capacity")
        _check(self.requested <= self.allocated <= self.reserved, "requested <= allocated <= reserved fails")


def _expandable_size(block: _Block) -> int:
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def simulate(events: Iterable[Event], config: AllocatorConfig = AllocatorConfig(),
             capacity: int | None = None) -> AllocatorStats:
    """Replay ``events`` through a fresh caching allocator and report its peaks and final layout.

    ``capacity`` (bytes) bounds reserved memory as ``torch.cuda.set_per_process_memory_fraction``
    does; only with it do cached blocks get released (and ``garbage_collection_threshold`` act).
    Raises OutOfMemory when a request cannot be served within it."""
    allocator = CachingAllocator(config, capacity)
    for event in events:
        allocator.apply(event)
    return allocator.stats()
