"""fastsave.buffer_pool: a reader's scratch buffer, and the save's pool that reuses its memory.

The property that matters: memory goes back to the pool only when its owner can no longer read
it, so two living owners never share it; and a dead owner's memory is what the next one gets.
"""

from __future__ import annotations

import gc

import torch

from fastsave.buffer_pool import ReusedBuffer, pooled_buffers


def test_a_buffer_is_reused_until_it_must_grow():
    buffer = ReusedBuffer(torch.float32)
    first = buffer.take(100, (10, 10))
    assert first.shape == (10, 10) and first.dtype == torch.float32
    assert buffer.take(50).data_ptr() == first.data_ptr()  # smaller: the same memory
    grown = buffer.take(1000)
    assert grown.numel() == 1000 and grown.dtype == torch.float32


def test_a_dead_owners_memory_backs_the_next_owner_and_living_owners_never_share():
    with pooled_buffers() as pool:
        owner = ReusedBuffer(torch.float32)
        address = owner.take(4096).data_ptr()
        other = ReusedBuffer(torch.bfloat16)
        assert other.take(4096).data_ptr() != address  # both alive: separate memory
        del owner
        gc.collect()
        assert pool.free_bytes == 4096 * 4
        successor = ReusedBuffer(torch.uint8)
        assert successor.take(1000).data_ptr() == address  # the dead owner's memory
        assert pool.free_bytes == 0


def test_growing_gives_the_smaller_memory_back_and_the_pool_hands_out_the_smallest_that_fits():
    with pooled_buffers() as pool:
        owner = ReusedBuffer()
        small = owner.take(1000).data_ptr()
        owner.take(10_000)
        assert pool.free_bytes == 1000
        big = ReusedBuffer()
        big.take(20_000)
        del big
        gc.collect()
        chooser = ReusedBuffer()
        assert chooser.take(900).data_ptr() == small  # 1000 bytes fit: not the 20000


def test_outside_a_save_nothing_is_pooled():
    owner = ReusedBuffer()
    owner.take(1000)
    del owner
    gc.collect()
    with pooled_buffers() as pool:
        assert pool.free_bytes == 0
