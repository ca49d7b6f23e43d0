"""The caching-allocator simulator against outcomes derived by hand from the rules in
docs/allocator.md (PyTorch's c10/cuda/CUDACachingAllocator.cpp), plus property tests.

Sizes are in MiB (M) where whole; each test spells out the arithmetic of its expected numbers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memcalc.allocator import (
    LARGE_BUFFER,
    MIN_LARGE_ALLOC,
    SMALL_SIZE,
    AllocatorConfig,
    BlockInfo,
    CachingAllocator,
    Event,
    OutOfMemory,
    allocation_size,
    round_size,
    simulate,
)
from memcalc.errors import SettingsError

M = 1 << 20
alloc, free = Event.alloc, Event.free


def layout(stats, index=0):
    """The (size, allocated) pairs of one final segment, in address order."""
    return [(block.size, block.allocated) for block in stats.segments[index].blocks]


# -- rounding and segment sizes ------------------------------------------------------------------

@pytest.mark.parametrize("size, divisions, expected", [
    (1, None, 512),  # below kMinBlockSize: 512
    (512, None, 512),
    (513, None, 1024),  # next multiple of 512
    (5 * M + 1, None, 5 * M + 512),
    (5 * M + 1, 1, 5 * M + 512),  # one division: no power-of-2 rounding
    (1200, 4, 1536),  # 1200 is not above 512 * 4 = 2048: plain 512 rounding
    (3000, 4, 3072),  # between 2048 and 4096 in steps of 512: 2560, 3072
    (4 * M, 4, 4 * M),  # a power of 2 stays
    (5 * M + 1, 4, 6 * M),  # between 4 and 8 MiB in steps of 1 MiB: 6 MiB
    (9 * M + 1, 2, 12 * M),  # between 8 and 16 MiB in steps of 4 MiB: 12 MiB
])
def test_round_size(size, divisions, expected):
    assert round_size(size, AllocatorConfig(roundup_power2_divisions=divisions)) == expected


@pytest.mark.parametrize("size, expected", [
    (512, 2 * M), (SMALL_SIZE, 2 * M),  # small pool: a 2 MiB segment
    (SMALL_SIZE + 512, 20 * M), (MIN_LARGE_ALLOC - 512, 20 * M),  # 1-10 MiB: a 20 MiB segment
    (MIN_LARGE_ALLOC, 10 * M), (10 * M + 512, 12 * M), (30 * M, 30 * M),  # else rounded up to 2 MiB
])
def test_allocation_size(size, expected):
    assert allocation_size(size) == expected


# -- the default allocator -----------------------------------------------------------------------

def test_one_byte_reserves_a_small_segment():
    # 1 B rounds to 512 B, a small request (<= 1 MiB): a 2 MiB segment, split (2 MiB - 512 >= 512).
    stats = simulate([alloc(1, 1)])
    assert (stats.peak_reserved, stats.peak_allocated, stats.peak_requested) == (2 * M, 512, 1)
    assert stats.segments[0].pool == "small"
    assert stats.segments[0].blocks == (BlockInfo(512, True, 1, 1), BlockInfo(2 * M - 512, False))


def test_zero_bytes_reach_no_allocator():
    stats = simulate([alloc(1, 0), free(1)])
    assert (stats.peak_reserved, stats.num_allocs, stats.num_frees, stats.num_segments) == (0, 0, 0, 0)


def test_second_5mib_request_splits_the_20mib_segment():
    # 5 MiB is in 1-10 MiB: a 20 MiB segment, split into 5 + 15 (15 > 1 MiB); the second 5 MiB is
    # the best fit in the 15 MiB rest: 5 + 10.
    stats = simulate([alloc(1, 5 * M), alloc(2, 5 * M)])
    assert (stats.peak_reserved, stats.peak_allocated, stats.num_device_allocs) == (20 * M, 10 * M, 1)
    assert layout(stats) == [(5 * M, True), (5 * M, True), (10 * M, False)]


def test_large_requests_get_their_own_segment_rounded_to_2mib():
    # 30 MiB >= 10 MiB: a segment of exactly 30 MiB.
    assert simulate([alloc(1, 30 * M)]).peak_reserved == 30 * M
    # 31 MiB + 1 B rounds to 31 MiB + 512, its segment to 32 MiB; the rest, 1 MiB - 512, is not
    # above 1 MiB, so it is not split off and the request holds all 32 MiB.
    stats = simulate([alloc(1, 31 * M + 1)])
    assert (stats.peak_reserved, stats.peak_allocated) == (32 * M, 32 * M)
    assert layout(stats) == [(32 * M, True)]


def test_freed_block_too_small_for_a_slightly_larger_request():
    # 30 MiB is freed and cached; 30 MiB + 512 does not fit it: a new segment of 32 MiB (rounded to
    # 2 MiB), split since 32 MiB - (30 MiB + 512) = 2 MiB - 512 > 1 MiB. Reserved 30 + 32 = 62 MiB.
    stats = simulate([alloc(1, 30 * M), free(1), alloc(2, 30 * M + 512)])
    assert (stats.peak_reserved, stats.final_reserved, stats.final_allocated) == (62 * M, 62 * M, 30 * M + 512)
    assert layout(stats, 0) == [(30 * M, False)]
    assert layout(stats, 1) == [(30 * M + 512, True), (2 * M - 512, False)]
    # A smaller request reuses it: 29 MiB leaves 1 MiB, not above 1 MiB, so it takes all 30 MiB.
    stats = simulate([alloc(1, 30 * M), free(1), alloc(2, 29 * M)])
    assert (stats.peak_reserved, stats.final_allocated, stats.num_device_allocs) == (30 * M, 30 * M, 1)


def test_best_fit_takes_the_smallest_block_then_the_lowest_address():
    # One 20 MiB segment: A 6, B 2, C 8, D 2, 2 MiB left (each rest > 1 MiB, so each splits).
    # Free A and C: free blocks of 6, 8 and 2 MiB. E (5 MiB) takes the 6 MiB block whole (rest
    # 1 MiB is not split); F (7 MiB) the 8 MiB block whole. Allocated 6 + 2 + 8 + 2 = 18 MiB.
    events = [alloc(1, 6 * M), alloc(2, 2 * M), alloc(3, 8 * M), alloc(4, 2 * M), free(1), free(3),
              alloc(5, 5 * M), alloc(6, 7 * M)]
    stats = simulate(events)
    assert [(b.size, b.block_id) for b in stats.segments[0].blocks] == [
        (6 * M, 5), (2 * M, 2), (8 * M, 6), (2 * M, 4), (2 * M, None)]
    assert (stats.final_allocated, stats.peak_reserved) == (18 * M, 20 * M)
    # Equal sizes: the lowest address. A, B, C of 5 MiB; free A; D takes A's place, not the end.
    stats = simulate([alloc(1, 5 * M), alloc(2, 5 * M), alloc(3, 5 * M), free(1), alloc(4, 5 * M)])
    assert [b.block_id for b in stats.segments[0].blocks] == [4, 2, 3, None]


def test_coalescing_lets_a_bigger_block_fit():
    # A, B, C of 5 MiB in one 20 MiB segment. Freeing A then B merges them into 10 MiB at the
    # start, which holds D (8 MiB): split into 8 + 2. No new segment: reserved stays 20 MiB.
    events = [alloc(1, 5 * M), alloc(2, 5 * M), alloc(3, 5 * M), free(1), free(2), alloc(4, 8 * M)]
    stats = simulate(events)
    assert layout(stats) == [(8 * M, True), (2 * M, False), (5 * M, True), (5 * M, False)]
    assert (stats.peak_reserved, stats.num_device_allocs) == (20 * M, 1)
    # Freeing C and D merges all four blocks back into one unsplit 20 MiB block.
    stats = simulate(events + [free(3), free(4)])
    assert layout(stats) == [(20 * M, False)]
    assert (stats.final_reserved, stats.final_allocated) == (20 * M, 0)


def test_pools_and_streams_do_not_share_blocks():
    # 1 MiB is the largest small request (2 MiB segment, split 1 + 1); 1 MiB + 1 rounds to
    # 1 MiB + 512 and is large (20 MiB segment). Reserved 2 + 20 = 22 MiB.
    stats = simulate([alloc(1, SMALL_SIZE), alloc(2, SMALL_SIZE + 1)])
    assert (stats.peak_reserved, stats.peak_allocated) == (22 * M, 2 * M + 512)
    assert [s.pool for s in stats.segments] == ["small", "large"]
    # A block freed on stream 0 is not reused on stream 1: 20 + 20 MiB.
    stats = simulate([alloc(1, 5 * M, stream=0), free(1), alloc(2, 5 * M, stream=1)])
    assert stats.peak_reserved == 40 * M
    assert [(s.stream, s.allocated) for s in stats.segments] == [(0, 0), (1, 5 * M)]


# -- max_split_size ------------------------------------------------------------------------------

def test_max_split_size_keeps_big_blocks_for_big_requests():
    events = [alloc(1, 100 * M), free(1), alloc(2, 50 * M)]
    # Without it, 50 MiB splits the cached 100 MiB block (rest 50 > 1 MiB): reserved 100 MiB.
    stats = simulate(events)
    assert (stats.peak_reserved, stats.final_allocated) == (100 * M, 50 * M)
    # With 64 MiB, a request below it takes no block of 64 MiB or more: a new 50 MiB segment.
    stats = simulate(events, AllocatorConfig(max_split_size=64 * M))
    assert stats.peak_reserved == 150 * M
    assert layout(stats, 0) == [(100 * M, False)]


def test_oversize_blocks_serve_requests_within_the_rounding_limit_unsplit():
    config = AllocatorConfig(max_split_size=64 * M)
    # 90 MiB >= 64 MiB may take the cached 100 MiB block (100 < 90 + 20), whole: not split.
    stats = simulate([alloc(1, 100 * M), free(1), alloc(2, 90 * M)], config)
    assert (stats.peak_reserved, stats.final_allocated) == (100 * M, 100 * M)
    # 79 MiB may not (100 >= 79 + 20): a new segment of 80 MiB (79 rounded to 2 MiB), unsplit.
    stats = simulate([alloc(1, 100 * M), free(1), alloc(2, 79 * M)], config)
    assert (stats.peak_reserved, stats.final_allocated) == (180 * M, 80 * M)
    assert layout(stats, 1) == [(80 * M, True)]
    # max_non_split_rounding_mb:40 widens the limit: 100 < 79 + 40, so it is reused.
    config = AllocatorConfig(max_split_size=64 * M, max_non_split_rounding_size=40 * M)
    assert simulate([alloc(1, 100 * M), free(1), alloc(2, 79 * M)], config).peak_reserved == 100 * M


# -- capacity pressure ---------------------------------------------------------------------------

def test_capacity_pressure_frees_cached_blocks_before_retrying():
    # 30 MiB cached; 35 MiB needs a 36 MiB segment: 30 + 36 > 40, so every unsplit cached block is
    # freed (30 MiB) and the retry fits: reserved 36 MiB, peak max(30, 36). 36 - 35 = 1 MiB is not
    # split off, so 36 MiB are allocated.
    events = [alloc(1, 30 * M), free(1), alloc(2, 35 * M)]
    stats = simulate(events, capacity=40 * M)
    assert (stats.peak_reserved, stats.final_reserved, stats.final_allocated) == (36 * M, 36 * M, 36 * M)
    assert (stats.num_device_frees, stats.num_alloc_retries) == (1, 1)
    # Without a capacity nothing is freed: 30 + 36 = 66 MiB.
    assert simulate(events).peak_reserved == 66 * M


def test_capacity_pressure_frees_cached_small_segments_too():
    # A (30 MiB) live; a 1 B block freed leaves its 2 MiB small segment cached: 32 MiB reserved.
    # B (10 MiB, a 10 MiB segment): 32 + 10 > 40; freeing the 2 MiB segment makes 30 + 10 = 40 fit.
    stats = simulate([alloc(1, 30 * M), alloc(2, 1), free(2), alloc(3, 10 * M)], capacity=40 * M)
    assert (stats.peak_reserved, stats.final_reserved, stats.num_device_frees) == (40 * M, 40 * M, 1)
    assert [s.pool for s in stats.segments] == ["large", "large"]


def test_out_of_memory_when_even_an_empty_cache_cannot_fit():
    # A (30 MiB) is live and nothing is cached: B's 20 MiB segment cannot fit in 40 MiB.
    with pytest.raises(OutOfMemory) as raised:
        simulate([alloc(1, 30 * M), alloc(2, 20 * M)], capacity=40 * M)
    oom = raised.value
    assert (oom.event_index, oom.requested_bytes, oom.size_bytes, oom.alloc_bytes) == (1, 20 * M, 20 * M, 20 * M)
    assert (oom.reserved_bytes, oom.allocated_bytes, oom.capacity_bytes) == (30 * M, 30 * M, 40 * M)
    assert "20971520 bytes" in str(oom)


def test_release_available_cached_blocks_frees_one_oversize_block():
    # max_split_size 64 MiB. A 1 B block freed keeps a 2 MiB small segment; 130 MiB cached:
    # 132 MiB reserved. B (70 MiB) may not take the 130 MiB block (130 >= 70 + 20), and a 70 MiB
    # segment does not fit (132 + 70 > 180): the smallest cached block of at least
    # max(70, 64) = 70 MiB, the 130, is freed alone and the retry fits: 2 + 70 = 72 MiB.
    events = [alloc(1, 1), free(1), alloc(2, 130 * M), free(2), alloc(3, 70 * M)]
    stats = simulate(events, AllocatorConfig(max_split_size=64 * M), capacity=180 * M)
    assert (stats.final_reserved, stats.peak_reserved, stats.num_device_frees) == (72 * M, 132 * M, 1)
    assert (stats.num_alloc_retries, [s.pool for s in stats.segments]) == (0, ["small", "large"])


def test_release_available_cached_blocks_frees_from_the_largest_down():
    config = AllocatorConfig(max_split_size=64 * M)
    # 100 and 110 MiB cached (210 MiB); C (150 MiB) fits neither and 210 + 150 > 250. No block is
    # >= 150 MiB, so oversize blocks go from the largest: 110 (< 150), then 100 (210 >= 150).
    events = [alloc(1, 100 * M), alloc(2, 110 * M), free(1), free(2), alloc(3, 150 * M)]
    stats = simulate(events, config, capacity=250 * M)
    assert (stats.final_reserved, stats.num_device_frees, stats.num_alloc_retries) == (150 * M, 2, 0)
    # With L (120 MiB) live and only 100 MiB cached, freeing the 100 falls short of 150, so the
    # allocator also empties the cache and retries: 120 + 150 = 270 <= 280.
    events = [alloc(1, 120 * M), alloc(2, 100 * M), free(2), alloc(3, 150 * M)]
    stats = simulate(events, config, capacity=280 * M)
    assert (stats.final_reserved, stats.num_device_frees, stats.num_alloc_retries) == (270 * M, 1, 1)


def test_garbage_collection_frees_the_oldest_cached_blocks():
    # Capacity 100 MiB, threshold 0.5: collect when reserved > 50 MiB. A (30) and B (40) are
    # allocated and freed: 70 MiB reserved. Ages count large-pool searches since caching: A was
    # cached after search 1, B after search 2, and C's search is number 3: A is 2 old, B 1.
    # C (50) fits no cached block; 70 > 50, so 20 MiB must go: blocks at least the mean age (1.5)
    # old go, so A (30 MiB) does, which is enough. Then 40 + 50 = 90 <= 100.
    events = [alloc(1, 30 * M), free(1), alloc(2, 40 * M), free(2), alloc(3, 50 * M)]
    config = AllocatorConfig(garbage_collection_threshold=0.5)
    stats = simulate(events, config, capacity=100 * M)
    assert (stats.final_reserved, stats.peak_reserved, stats.num_device_frees) == (90 * M, 90 * M, 1)
    assert [layout(stats, i) for i in (0, 1)] == [[(40 * M, False)], [(50 * M, True)]]
    # Threshold 0.2 (20 MiB): 50 MiB must go. A goes in the first pass (30 < 50); the second pass
    # has B alone, at the mean age, so it goes too. Then 0 + 50.
    stats = simulate(events, AllocatorConfig(garbage_collection_threshold=0.2), capacity=100 * M)
    assert (stats.final_reserved, stats.num_device_frees, stats.num_alloc_retries) == (50 * M, 2, 0)
    # Without collection the 50 MiB segment fails (70 + 50 > 100) and the whole cache goes.
    stats = simulate(events, capacity=100 * M)
    assert (stats.final_reserved, stats.peak_reserved, stats.num_device_frees) == (50 * M, 70 * M, 2)
    # Without a capacity (no memory fraction) the threshold does nothing: 30 + 40 + 50 MiB.
    assert simulate(events, config).peak_reserved == 120 * M


def test_roundup_power2_divisions_changes_the_segment():
    # 9 MiB + 1 rounds to 9 MiB + 512 (< 10 MiB: a 20 MiB segment); with 2 divisions to 12 MiB,
    # which gets a 12 MiB segment.
    assert simulate([alloc(1, 9 * M + 1)]).peak_reserved == 20 * M
    stats = simulate([alloc(1, 9 * M + 1)], AllocatorConfig(roundup_power2_divisions=2))
    assert (stats.peak_reserved, stats.peak_allocated) == (12 * M, 12 * M)


# -- expandable segments -------------------------------------------------------------------------

EXPANDABLE = AllocatorConfig(expandable_segments=True)


def test_expandable_small_request_maps_one_2mib_page():
    stats = simulate([alloc(1, 1)], EXPANDABLE)
    assert (stats.peak_reserved, stats.peak_allocated) == (2 * M, 512)
    assert stats.segments[0].expandable


def test_expandable_segment_grows_instead_of_adding_segments():
    # Each request is freed before the next. Default: 12, 14, 16, 24 MiB segments (none fits the
    # next): 66 MiB. Expandable: 12 MiB maps one 20 MiB page; 14 and 16 fit the freed 20 MiB; 24
    # takes the free 20 MiB plus one more page mapped after it: 40 MiB, in two mappings.
    events = [alloc(1, 12 * M), free(1), alloc(2, 14 * M), free(2), alloc(3, 16 * M), free(3), alloc(4, 24 * M)]
    assert simulate(events).peak_reserved == 66 * M
    stats = simulate(events, EXPANDABLE)
    assert (stats.peak_reserved, stats.num_device_allocs, stats.num_segments) == (40 * M, 2, 1)
    assert layout(stats) == [(24 * M, True), (16 * M, False)]


def test_expandable_reserves_less_for_alternating_batch_sizes():
    # Two iterations alternate: three 11 MiB tensors, then three 13 MiB ones, each freed at the end.
    def iteration(first_id, size):
        ids = range(first_id, first_id + 3)
        return [alloc(i, size) for i in ids] + [free(i) for i in ids]

    events = iteration(0, 11 * M) + iteration(3, 13 * M) + iteration(6, 11 * M) + iteration(9, 13 * M)
    # Default: 11 MiB gets a 12 MiB segment (rest 1 MiB not split), three of them; 13 MiB fits none,
    # three 14 MiB segments: 36 + 42 = 78 MiB, all reused by the later iterations.
    assert simulate(events).peak_reserved == 78 * M
    # Expandable (20 MiB pages): 11 + 11 + 11 = 33 MiB tile two pages (40 MiB); 3 x 13 = 39 fit too.
    stats = simulate(events, EXPANDABLE)
    assert (stats.peak_reserved, stats.num_device_allocs) == (40 * M, 2)
    assert layout(stats) == [(40 * M, False)]


def test_expandable_unmaps_free_pages_under_pressure():
    # A (30 MiB) maps two 20 MiB pages, then is freed; a 1 B block maps a 2 MiB small page: 42 MiB.
    # C (50 MiB): 42 + 50 > 64, so the free large pages are unmapped (the small page stays, half
    # used) and the empty large segment dropped: 2 MiB. C then maps three pages: 2 + 60 = 62 MiB.
    events = [alloc(1, 30 * M), free(1), alloc(2, 1), alloc(3, 50 * M)]
    stats = simulate(events, EXPANDABLE, capacity=64 * M)
    assert (stats.final_reserved, stats.peak_reserved) == (62 * M, 62 * M)
    assert (stats.num_device_allocs, stats.num_device_frees, stats.num_alloc_retries) == (3, 1, 1)
    assert [(s.pool, s.size) for s in stats.segments] == [("small", 2 * M), ("large", 60 * M)]
    # With 60 MiB, 50 MiB would fit by bytes, but not in 20 MiB pages: 2 + 60 > 60.
    with pytest.raises(OutOfMemory):
        simulate(events, EXPANDABLE, capacity=60 * M)


def test_expandable_best_fit_counts_room_to_grow():
    # One 20 MiB page: A 5, B 8, C 3, then 4 MiB free before the unmapped rest. Free B. D (4 MiB)
    # would fit the last 4 MiB exactly, but that block can grow into the unmapped space, so it
    # counts as larger than the 8 MiB hole, which D takes (split 4 + 4).
    events = [alloc(1, 5 * M), alloc(2, 8 * M), alloc(3, 3 * M), free(2), alloc(4, 4 * M)]
    stats = simulate(events, EXPANDABLE)
    assert [(b.size, b.block_id) for b in stats.segments[0].blocks] == [
        (5 * M, 1), (4 * M, 4), (4 * M, None), (3 * M, 3), (4 * M, None)]


def test_expandable_unmaps_whole_pages_only_and_refills_the_hole():
    # Capacity 144 MiB; 20 MiB pages, offsets in MiB. A 10 [0,10) maps page 0. B 60 takes the free
    # [10,20) and maps 3 pages more: [10,70). C 5 [70,75) fits the rest of page 3. Free B: [10,70)
    # free, 80 MiB mapped. D (70 MiB) fits no free block and 80 + 70 > 144: the free [10,70) gives
    # back its whole pages [20,60) (40 MiB), keeping [10,20) and [60,70) mapped: 40 MiB reserved.
    # The hole [20,60) with its free neighbours holds 60 < 70 MiB, so D starts at the free [75,80)
    # and maps 4 pages after it, [80,160): 40 + 80 = 120 MiB.
    # E (18 MiB) fits no free block (10, 10, 15 MiB): the hole with [10,20) before it has room, so
    # one page [20,40) is mapped and E takes [10,28): 140 MiB, in two mapped ranges.
    events = [alloc(1, 10 * M), alloc(2, 60 * M), alloc(3, 5 * M), free(2), alloc(4, 70 * M), alloc(5, 18 * M)]
    stats = simulate(events, EXPANDABLE, capacity=144 * M)
    assert (stats.final_reserved, stats.peak_reserved) == (140 * M, 140 * M)
    assert (stats.num_device_allocs, stats.num_device_frees, stats.num_alloc_retries) == (4, 1, 1)
    assert [[(b.size, b.block_id) for b in s.blocks] for s in stats.segments] == [
        [(10 * M, 1), (18 * M, 5), (12 * M, None)],
        [(10 * M, None), (5 * M, 3), (70 * M, 4), (15 * M, None)]]
    # A 10 MiB block maps page 0; B (15 MiB) needs 5 MiB past it, but a whole page more makes
    # 40 > 38 MiB: out of memory, though 20 + 15 bytes would fit.
    with pytest.raises(OutOfMemory):
        simulate([alloc(1, 10 * M), alloc(2, 15 * M)], EXPANDABLE, capacity=38 * M)


def test_expandable_segments_are_per_stream():
    stats = simulate([alloc(1, 5 * M, stream=0), free(1), alloc(2, 5 * M, stream=1)], EXPANDABLE)
    assert stats.peak_reserved == 40 * M  # one 20 MiB page in each stream's segment
    assert [s.stream for s in stats.segments] == [0, 1]


# -- inputs --------------------------------------------------------------------------------------

def test_bad_events_are_refused():
    with pytest.raises(ValueError, match="allocated twice"):
        simulate([alloc(1, 8), alloc(1, 8)])
    with pytest.raises(ValueError, match="not allocated"):
        simulate([free(7)])
    with pytest.raises(ValueError):
        Event("realloc", 1, 8)
    with pytest.raises(ValueError):
        Event.alloc(1, -1)


@pytest.mark.parametrize("settings", [
    {"max_split_size": 10 * M},  # below PyTorch's minimum of 20 MiB
    {"max_split_size": 64 * M + 1},  # not whole MiB
    {"garbage_collection_threshold": 1.0},
    {"roundup_power2_divisions": 3},
])
def test_bad_settings_are_refused(settings):
    with pytest.raises(SettingsError):
        AllocatorConfig(**settings)


def test_config_from_env():
    config = AllocatorConfig.from_env(
        "max_split_size_mb:128, expandable_segments:True,garbage_collection_threshold:0.6,"
        "roundup_power2_divisions:4,max_non_split_rounding_mb:256,release_lock_on_cudamalloc:True")
    assert config == AllocatorConfig(max_split_size=128 * M, expandable_segments=True,
                                     garbage_collection_threshold=0.6, roundup_power2_divisions=4,
                                     max_non_split_rounding_size=256 * M)
    assert AllocatorConfig.from_env("") == AllocatorConfig()
    with pytest.raises(NotImplementedError):
        AllocatorConfig.from_env("roundup_power2_divisions:[256:1,>:4]")
    with pytest.raises(NotImplementedError):
        AllocatorConfig.from_env("backend:cudaMallocAsync")
    with pytest.raises(SettingsError):
        AllocatorConfig.from_env("max_split_size:128")


def test_no_torch_import():
    code = "import sys, memcalc.allocator; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- properties ----------------------------------------------------------------------------------

SIZES = st.one_of(
    st.integers(0, 4096),
    st.integers(1, 3 * M),
    st.integers(3 * M, 48 * M),
    st.sampled_from([512, 513, SMALL_SIZE, SMALL_SIZE + 1, MIN_LARGE_ALLOC - 1, MIN_LARGE_ALLOC, LARGE_BUFFER,
                     64 * M]),
)
OPS = st.lists(st.one_of(st.tuples(st.just("alloc"), SIZES, st.integers(0, 1)),
                         st.tuples(st.just("free"), st.integers(0, 1 << 16), st.just(0))), max_size=40)
CONFIGS = st.sampled_from([
    AllocatorConfig(),
    AllocatorConfig(max_split_size=20 * M),
    AllocatorConfig(max_split_size=64 * M, max_non_split_rounding_size=40 * M),
    AllocatorConfig(roundup_power2_divisions=4),
    AllocatorConfig(expandable_segments=True),
    AllocatorConfig(expandable_segments=True, roundup_power2_divisions=2),
])


def to_events(ops) -> list[Event]:
    """Valid events from drawn ops: a free picks one of the live blocks (none live: skipped)."""
    events, live, next_id = [], [], 0
    for kind, value, stream in ops:
        if kind == "alloc":
            events.append(alloc(next_id, value, stream))
            live.append(next_id)
            next_id += 1
        elif live:
            events.append(free(live.pop(value % len(live))))
    return events


@given(OPS, CONFIGS)
def test_reserved_bounds_allocated_bounds_requested_and_never_shrinks(ops, config):
    events = to_events(ops)
    allocator = CachingAllocator(config)
    live_raw = peak_live_raw = last_reserved = 0
    sizes = {}
    for event in events:
        allocator.apply(event)
        if event.kind == "alloc":
            sizes[event.block_id] = event.size
            live_raw += event.size
        else:
            live_raw -= sizes.pop(event.block_id)
        peak_live_raw = max(peak_live_raw, live_raw)
        allocator.check_invariants()
        assert allocator.reserved >= allocator.allocated >= live_raw == allocator.requested
        assert allocator.reserved >= last_reserved  # no cudaFree without capacity pressure
        last_reserved = allocator.reserved
    stats = allocator.stats()
    assert stats.peak_reserved >= stats.peak_allocated >= stats.peak_requested == peak_live_raw
    assert stats.num_device_frees == 0 and stats.final_reserved == stats.peak_reserved
    assert sum(s.size for s in stats.segments) == stats.final_reserved
    assert simulate(events, config) == stats


@given(OPS, CONFIGS, st.sampled_from([8 * M, 40 * M, 100 * M]), st.sampled_from([None, 0.3, 0.8]))
def test_capacity_is_never_exceeded(ops, config, capacity, threshold):
    config = replace(config, garbage_collection_threshold=threshold)
    allocator = CachingAllocator(config, capacity)
    failed = set()
    for event in to_events(ops):
        if event.block_id in failed:
            continue  # its allocation ran out of memory
        try:
            allocator.apply(event)
        except OutOfMemory as oom:
            failed.add(event.block_id)
            # Refused only when even the emptied cache leaves no room for the segment (or, with
            # expandable segments, for the 2 or 20 MiB pages).
            page = 2 * M if oom.size_bytes <= SMALL_SIZE else 20 * M
            pages = page * -(-oom.size_bytes // page) if config.expandable_segments else 0
            assert oom.reserved_bytes + max(oom.alloc_bytes, pages) > capacity
        allocator.check_invariants()
        assert allocator.reserved <= capacity and allocator.peak_reserved <= capacity
