"""
The benchmark's RPC part (ds4tw.bench._rpc) without a model, workers or
sockets: its arguments; C{ss -tinH} and C{/proc/PID/io} parsed from
output captured on this machine around a real split (two
C{ds4tw-rpc-worker}s, the demo model, a 200-token prompt and 64 decoded
tokens); ggml-rpc's framing parsed from byte streams fed whole and a
byte at a time; and the paired arithmetic, the decomposition of a
counted turn and the computed network table on canned numbers.

Caveat: these prove the parsing and the arithmetic. That the counts
match a real split is what the bench checks itself on every run (the
protocol tap's bytes against C{ss} on the tap's port), and what it
measured is in docs/performance.md.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from ds4tw.bench import _rpc
from ds4tw.bench.__main__ import parse

# Captured: `ss -tinH state established` with a model split over workers on
# 127.0.0.1:37949 and 127.0.0.1:57605, after the load (BEFORE) and after a
# 201-token prompt and 64 tokens decoded (AFTER); only the connections to
# the first worker kept, both ends of each.
BEFORE = (
    "0      0      127.0.0.1:36384 127.0.0.1:37949\n"
    "\t bbr wscale:10,10 rto:204 rtt:0.221/0.39 ato:40 mss:65483 pmtu:65535 rcvmss:536 "
    "advmss:65483 cwnd:14 ssthresh:8 bytes_sent:35600824 bytes_retrans:36847 "
    "bytes_acked:35563978 bytes_received:292 segs_out:1066 segs_in:388 data_segs_out:1048 "
    "data_segs_in:30 bbr:(bw:174621322920bps,mrtt:0.003,pacing_gain:1.25,cwnd_gain:2) "
    "send 33185954751bps lastsnd:32 lastrcv:32 lastack:32 pacing_rate 216093887112bps "
    "delivery_rate 174621333328bps delivered:1049 app_limited busy:64ms "
    "rwnd_limited:44ms(68.8%) retrans:0/1 dsack_dups:1 reordering:6 rcv_space:65495 "
    "rcv_ssthresh:65495 minrtt:0.003 snd_wnd:4287488\n"
    "0      0      127.0.0.1:37949 127.0.0.1:36384\n"
    "\t bbr wscale:10,10 rto:204 rtt:0.123/0.229 ato:40 mss:32768 pmtu:65535 rcvmss:65483 "
    "advmss:65483 cwnd:18 bytes_sent:292 bytes_acked:292 bytes_received:35563977 "
    "segs_out:387 segs_in:1066 data_segs_out:30 data_segs_in:1048 "
    "bbr:(bw:74898281248bps,mrtt:0.004,pacing_gain:2.88672,cwnd_gain:2.88672) "
    "send 38362536585bps lastsnd:32 lastrcv:32 lastack:32 pacing_rate 936460800000bps "
    "delivery_rate 74898285712bps delivered:31 app_limited busy:8ms reordering:6 "
    "rcv_rtt:0.192 rcv_space:698076 rcv_ssthresh:4286988 minrtt:0.004 snd_wnd:65536"
    "                                                                \n"
)
AFTER = (
    "0      0      127.0.0.1:36384 127.0.0.1:37949\n"
    "\t bbr wscale:10,10 rto:204 rtt:1.241/1.988 ato:44 mss:65483 pmtu:65535 rcvmss:65483 "
    "advmss:65483 cwnd:14 ssthresh:8 bytes_sent:37111037 bytes_retrans:46207 "
    "bytes_acked:37064831 bytes_received:609140 segs_out:2504 segs_in:858 "
    "data_segs_out:2412 data_segs_in:179 "
    "bbr:(bw:142871988640bps,mrtt:0.001,pacing_gain:1.25,cwnd_gain:2) send 5909827558bps "
    "lastsnd:20 lastrcv:16 lastack:16 pacing_rate 176804085944bps "
    "delivery_rate 142872000000bps delivered:2413 app_limited busy:720ms "
    "rwnd_limited:44ms(6.1%) retrans:0/31 dsack_dups:31 reordering:6 rcv_rtt:0.035 "
    "rcv_space:261782 rcv_ssthresh:1625732 minrtt:0.001 snd_wnd:4291584\n"
    "0      0      127.0.0.1:37949 127.0.0.1:36384\n"
    "\t bbr wscale:10,10 rto:204 rtt:0.112/0.067 ato:40 mss:65483 pmtu:65535 rcvmss:65483 "
    "advmss:65483 cwnd:14 bytes_sent:609140 bytes_acked:609140 bytes_received:37064830 "
    "segs_out:857 segs_in:2504 data_segs_out:179 data_segs_in:2412 "
    "bbr:(bw:174621322920bps,mrtt:0.004,pacing_gain:1.25,cwnd_gain:2) send 65483000000bps "
    "lastsnd:16 lastrcv:20 lastack:16 pacing_rate 216093887112bps "
    "delivery_rate 36128551720bps delivered:180 app_limited busy:20ms "
    "rwnd_limited:4ms(20.0%) reordering:6 rcv_rtt:0.192 rcv_space:698076 "
    "rcv_ssthresh:4290564 minrtt:0.004 snd_wnd:1626112\n"
)
# Captured: /proc/PID/io of that worker over the same run. Its rchar is
# the Python start-up's file reads; the 37 MB it received from the
# socket (recv) is not in it.
PROC_IO = (
    "rchar: 7775385\nwchar: 919\nsyscr: 636\nsyscw: 111\nread_bytes: 65536\n"
    "write_bytes: 4096\ncancelled_write_bytes: 0\n"
)
PORT = 37949


# -- arguments ------------------------------------------------------------------


def test_only_rpc_is_an_option_of_its_own_on_the_real_model() -> None:
    args = parse(["--only", "rpc", "--quick", "--threads", "2"])
    assert (args.only, args.quick, args.threads) == ("rpc", True, 2)
    with pytest.raises(SystemExit):
        parse(["--only", "rpc", "--engine", "scripted"])


def test_sizes_and_the_half_split() -> None:
    full, quick = _rpc.sizes(False), _rpc.sizes(True)
    assert full.rounds % len(_rpc.ARMS) == 0 and quick.rounds % len(_rpc.ARMS) == 0
    assert quick.rounds < full.rounds and quick.decode_tokens < full.decode_tokens
    # The demo model: 30 repeating layers and the output layer.
    assert _rpc.half_layers(31) == 16  # the output layer and the upper 15 layers
    assert _rpc.rotate(_rpc.ARMS, 1) == ["child", "split", "half", "local"]


def test_the_worker_command_listens_on_loopback_with_its_threads() -> None:
    cmd = _rpc.worker_command(5000, 1)
    assert cmd[-6:] == ["--host", "127.0.0.1", "--port", "5000", "--threads", "1"]


# -- ss and /proc ----------------------------------------------------------------


def test_parse_ss_reads_both_ends_and_their_counters() -> None:
    conns = _rpc.parse_ss(BEFORE)
    assert [(c.local, c.peer) for c in conns] == [
        (("127.0.0.1", 36384), ("127.0.0.1", PORT)),
        (("127.0.0.1", PORT), ("127.0.0.1", 36384)),
    ]
    client, worker = conns
    assert client.counters["bytes_sent"] == 35600824
    assert client.counters["bytes_retrans"] == 36847
    assert client.counters["bytes_received"] == 292
    assert client.counters["data_segs_in"] == 30
    # ss leaves a zero bytes_retrans out; mss:32768 or rtt:0.123/0.229 are not counters.
    assert worker.counters["bytes_retrans"] == 0
    assert worker.counters["bytes_received"] == 35563977
    assert set(worker.counters) == set(_rpc.SS_COUNTERS)


def test_parse_ss_takes_the_state_column_and_other_address_forms() -> None:
    text = (
        "ESTAB 0 0 [::ffff:127.0.0.1]:8080 [::ffff:127.0.0.1]:5555\n"
        "\t cubic bytes_received:10 bytes_acked:3\n"
        "0 0 127.0.0.1:1 127.0.0.1:2\n"  # no details line: skipped
        "ESTAB 0 0 [::1]:7 [::1]:8\n"
        "\t cubic bytes_sent:4\n"
    )
    conns = _rpc.parse_ss(text)
    assert [(c.local, c.peer) for c in conns] == [
        (("::ffff:127.0.0.1", 8080), ("::ffff:127.0.0.1", 5555)),
        (("::1", 7), ("::1", 8)),
    ]
    assert conns[0].counters["bytes_received"] == 10 and conns[1].counters["bytes_sent"] == 4


def test_the_bytes_each_way_are_counted_where_they_are_received() -> None:
    before = _rpc.wire_snapshot(_rpc.parse_ss(BEFORE), [PORT, 1234])
    after = _rpc.wire_snapshot(_rpc.parse_ss(AFTER), [PORT, 1234])
    got = _rpc.wire_delta(before, after)
    # To the worker: its socket's bytes_received; the client's bytes_sent
    # moved more (37111037 - 35600824), retransmissions included.
    assert got["to_workers"] == 37064830 - 35563977 == 1500853
    assert (37111037 - 35600824) - got["to_workers"] == 46207 - 36847
    # From the worker: the client socket's bytes_received (mostly hidden
    # states: 576 floats, 2,304 bytes, for each of 264 tokens).
    assert got["from_workers"] == 609140 - 292 == 608848
    assert got["by_port"] == {
        str(PORT): {"to": 1500853, "from": 608848},
        "1234": {"to": 0, "from": 0},
    }
    assert got["lost_connections"] == 0


def test_a_new_connection_counts_from_zero_and_a_gone_one_is_reported() -> None:
    before = _rpc.wire_snapshot(_rpc.parse_ss(BEFORE), [PORT])
    fresh = _rpc.wire_snapshot(_rpc.parse_ss(AFTER.replace("36384", "36999")), [PORT])
    got = _rpc.wire_delta(before, fresh)
    assert got["to_workers"] == 37064830 and got["from_workers"] == 609140
    assert got["lost_connections"] == 2


def test_proc_io_is_parsed_and_is_not_the_socket_traffic() -> None:
    io = _rpc.parse_proc_io(PROC_IO)
    assert io["rchar"] == 7775385 and io["wchar"] == 919 and io["cancelled_write_bytes"] == 0
    assert io["rchar"] < 37064830  # what the worker received over its socket


def test_between_two_samples() -> None:
    snap = _rpc.wire_snapshot(_rpc.parse_ss(BEFORE), [PORT])
    later = _rpc.wire_snapshot(_rpc.parse_ss(AFTER), [PORT])
    a = {"wire": snap, "io": [{"rchar": 5, "wchar": 1}], "cpu": {"here": 1.0, "child": 2.0}}
    b = {"wire": later, "io": [{"rchar": 5, "wchar": 3}], "cpu": {"here": 1.5, "child": 1.9}}
    got = _rpc.between(a, b)
    assert got["wire"]["to_workers"] == 1500853
    assert got["workers_io"] == {"rchar": 0, "wchar": 2}
    assert got["cpu_s"] == {"here": 0.5, "child": 0.0}  # a clock never goes back
    local = _rpc.between({**a, "wire": None, "io": []}, {**b, "wire": None, "io": []})
    assert local["wire"] is None and local["workers_io"] is None


# -- the protocol ------------------------------------------------------------------


def request(name: str, payload: bytes) -> bytes:
    return struct.pack("<BQ", _rpc.COMMANDS.index(name), len(payload)) + payload


def reply(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


def test_the_command_numbers_are_ggml_rpcs() -> None:
    # ggml-rpc.cpp: static_assert(RPC_CMD_HELLO == 14); the enum's order.
    assert _rpc.COMMANDS.index("HELLO") == 14
    assert _rpc.COMMANDS.index("GRAPH_COMPUTE") == 10
    assert _rpc.COMMANDS.index("GRAPH_RECOMPUTE") == 16
    assert _rpc.command_name(99) == "UNKNOWN_99"
    assert set(_rpc.COMMANDS) >= _rpc.REPLIES
    assert not {"SET_TENSOR", "GRAPH_COMPUTE", "GRAPH_RECOMPUTE"} & _rpc.REPLIES


def feed_turn(ex: _rpc.Exchange, tally: _rpc.Tally, whole: bool) -> None:
    """A HELLO at load, then one step: inputs, a graph, a read of the output."""
    streams: list[tuple[_rpc.Frames, bytes, str]] = [
        (ex.requests, request("HELLO", bytes(24)), "load"),
        (ex.replies, reply(bytes(28)), "load"),
        (ex.requests, request("SET_TENSOR", bytes(2400)), "decode"),
        (ex.requests, request("GRAPH_RECOMPUTE", bytes(4)), "decode"),
        (ex.requests, request("DEVICE_COUNT", b"") + request("GET_TENSOR", bytes(24)), "decode"),
        # The replies come after the phase moved on: they count in their request's.
        (ex.replies, reply(bytes(4)) + reply(bytes(2304)), "after"),
    ]
    for frames, data, phase in streams:
        tally.phase = phase
        if whole:
            frames.feed(data)
        else:
            for i in range(len(data)):
                frames.feed(data[i : i + 1])
        assert frames.idle


@pytest.mark.parametrize("whole", [True, False])
def test_requests_and_replies_are_counted_by_phase(whole: bool) -> None:
    tally = _rpc.Tally()
    ex = _rpc.Exchange(tally)
    feed_turn(ex, tally, whole)
    assert tally.counts["load"]["HELLO"] == {
        "requests": 1,
        "request_bytes": 9 + 24,
        "replies": 1,
        "reply_bytes": 8 + 28,
    }
    decode = tally.totals("decode")
    assert decode == {
        "requests": 4,
        "request_bytes": 9 * 4 + 2400 + 4 + 0 + 24,
        "replies": 2,
        "reply_bytes": 8 + 4 + 8 + 2304,
    }
    assert tally.counts["decode"]["SET_TENSOR"]["replies"] == 0
    assert tally.counts["decode"]["GET_TENSOR"]["reply_bytes"] == 8 + 2304
    assert "after" not in tally.counts and ex.unmatched == 0


def test_a_reply_nobody_waits_for_is_counted_apart() -> None:
    tally = _rpc.Tally()
    ex = _rpc.Exchange(tally)
    ex.replies.feed(reply(b"xy"))
    assert ex.unmatched == 1 and tally.counts["?"]["UNMATCHED"]["reply_bytes"] == 10


# -- the arithmetic -----------------------------------------------------------------


def fake_trial(ttft: float, tps: float, ids: list[int], wire: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {
        "prompt_tokens": 200,
        "tokens": 65,
        "ids": ids,
        "ttft_s": ttft,
        "decode_tps": tps,
        "prefill": None,
        "decode": {
            "wire": None,
            "workers_io": None,
            "cpu_s": {"here": 0.64, "child": 0.0, "workers": 0.0},
        },
    }
    if wire:
        w = {"to_workers": 0, "from_workers": 0, "by_port": {}, "lost_connections": 0}
        t["prefill"] = {"wire": {**w, "to_workers": 1_000_000, "from_workers": 400_000}}
        t["decode"] = {
            "wire": {**w, "to_workers": 64 * 9_000, "from_workers": 64 * 199_000},
            "workers_io": {"rchar": 0, "wchar": 0},
            "cpu_s": {"here": 0.064, "child": 0.128, "workers": 0.64},
        }
    return t


def test_summarise_pairs_each_arm_with_the_baseline_of_its_round() -> None:
    rounds = []
    for r, (base_tps, split_tps) in enumerate([(50, 40), (60, 45), (40, 36), (55, 44)]):
        rounds.append(
            {
                "local": fake_trial(1.0, base_tps, [1, 2]),
                "child": fake_trial(1.1, base_tps * 0.95, [1, 2]),
                "split": fake_trial(1.2, split_tps, [1, 2] if r else [1, 3], wire=True),
                "half": fake_trial(1.0, base_tps, [1, 2], wire=True),
            }
        )
    got = _rpc.summarise(rounds)
    vs = got["vs_baseline"]
    # Paired per round: 0.8, 0.75, 0.9, 0.8 -> median 0.8, quartiles 0.7875 and 0.825.
    assert vs["split"]["decode_tps"]["median"] == pytest.approx(0.8)
    assert vs["split"]["decode_tps"]["p25"] == pytest.approx(0.7875)
    assert vs["split"]["decode_tps"]["p75"] == pytest.approx(0.825)
    # The ratio of the medians differs from the median of the ratios.
    assert vs["split"]["of_medians"]["decode_tps"] == pytest.approx(42 / 52.5)
    assert vs["child"]["decode_tps"]["median"] == pytest.approx(0.95)
    assert vs["split"]["ttft_diff_ms"]["median"] == pytest.approx(200)
    assert "local" not in vs
    per = got["per_arm"]
    assert per["split"]["same_tokens_as_baseline"] == 3 and per["half"]["trials"] == 4
    wire = per["split"]["wire"]
    assert wire["prefill_to_workers_per_prompt_token"]["median"] == 5_000
    assert wire["prefill_from_workers_bytes"]["median"] == 400_000
    assert wire["decode_to_workers_per_token"]["median"] == 9_000
    assert wire["decode_from_workers_per_token"]["median"] == 199_000
    assert "wire" not in per["local"]
    # 64 decoded tokens after the first per trial: 0.64 s -> 10 ms each.
    assert per["local"]["decode_cpu_ms_per_token"]["total"] == pytest.approx(10)
    assert per["split"]["decode_cpu_ms_per_token"] == pytest.approx(
        {"here": 1.0, "child": 2.0, "workers": 10.0, "total": 13.0}
    )


def counted() -> dict[str, Any]:
    """A counted turn: 201 prompt tokens, 65 decoded, two graph uploads in the decode."""
    return {
        "prompt_tokens": 201,
        "tokens": 65,
        "phases": {
            "prefill": {
                "totals": {
                    "requests": 25,
                    "request_bytes": 1_400_000,
                    "replies": 12,
                    "reply_bytes": 660_000,
                }
            },
            "decode": {
                "totals": {
                    "requests": 64 * 14 + 2,
                    "request_bytes": 64 * 9_000 + 380_000,
                    "replies": 128,
                    "reply_bytes": 64 * 199_000,
                },
                "by_command": {"GRAPH_COMPUTE": {"requests": 2, "request_bytes": 380_000}},
            },
        },
    }


def test_a_counted_turn_is_split_into_per_token_and_per_turn_costs() -> None:
    parts = _rpc.decompose(counted())
    assert parts["decode_to_workers_per_token"] == 9_000  # the graphs are per turn
    assert parts["decode_from_workers_per_token"] == 199_000
    assert parts["decode_bytes_per_token"] == 208_000
    assert parts["decode_round_trips_per_token"] == 2
    assert parts["decode_requests_per_token"] == 14
    assert (parts["decode_graph_uploads"], parts["decode_graph_bytes"]) == (2, 380_000)
    assert parts["prefill_bytes"] == 2_060_000 and parts["prefill_round_trips"] == 12
    assert parts["turn_bytes"] == 2_060_000 + 380_000


def test_the_network_table_is_the_round_trips_plus_the_bytes_at_the_rate() -> None:
    parts = _rpc.decompose(counted())
    lan = _rpc.Link("lan", 0.0002, 1e9, 1.0)
    wan = _rpc.Link("wan", 0.005, 1e8, 1.1)
    rows = _rpc.network_table(parts, local_decode_tps=50.0, local_ttft_s=1.0, links=[lan, wan])
    # LAN: 2 x 0.2 ms + 208,000 B x 8 / 1 Gbit/s = 0.4 + 1.664 ms.
    assert rows[0]["decode_added_ms_per_token"] == pytest.approx(2.064)
    assert rows[0]["decode_tps_at_local_compute"] == pytest.approx(1 / (0.020 + 0.002064))
    # Prefill: 12 x 0.2 ms + 2,060,000 B x 8 / 1 Gbit/s = 2.4 + 16.48 ms.
    assert rows[0]["prefill_added_ms"] == pytest.approx(18.88)
    assert rows[0]["ttft_s_at_local_compute"] == pytest.approx(1.01888)
    assert rows[0]["graph_uploads_added_ms"] == pytest.approx(3.04)
    # WAN: 2 x 5 ms + 208,000 x 1.1 x 8 / 100 Mbit/s = 10 + 18.304 ms.
    assert rows[1]["decode_added_ms_per_token"] == pytest.approx(28.304)
    assert (rows[1]["rtt_ms"], rows[1]["mbit_s"]) == (5.0, 100.0)
    assert _rpc.network_table(parts, None, None, [lan])[0]["decode_tps_at_local_compute"] is None
    # The framing factors are the packets' headers on the wire.
    assert [round(link.framing, 3) for link in _rpc.LINKS] == [1.053, 1.110, 1.110]


def test_the_printed_lines() -> None:
    rounds = [
        {
            "local": fake_trial(1.0, 50, [1]),
            "split": fake_trial(1.2, 40, [1], wire=True),
        }
    ]
    got = _rpc.summarise(rounds)
    parts = _rpc.decompose(counted())
    got["computed_network"] = {"split": {**parts, "links": _rpc.network_table(parts, 50, 1.0)}}
    text = "\n".join(_rpc.table(got))
    assert "split  TTFT 1.200 s, decode 40.0 tok/s; TTFT x1.200 [1.200, 1.200]" in text
    assert "decode 9,000 to, 199,000 from" in text
    assert "counted: 2.00 round trips and 208,000 bytes per decoded token" in text
    assert "computed, 1 GbE LAN, 0.2 ms RTT:" in text
    assert _rpc.table(None) == []
