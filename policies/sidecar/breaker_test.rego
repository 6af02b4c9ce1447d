# Table-driven tests of the default breaker policy: `opa test policies/`.
# Each case is one upstream in the input shape of the README; the thresholds
# are the shipped ones (thresholds.yaml) unless a test overrides them.
package sidecar.breaker_test

import data.sidecar.breaker

# --- building blocks -----------------------------------------------------------

# One 10 s slice: 50 requests, no errors, the given TTFB p99, no queueing.
slice(age, p99) := {
	"age_s": age, "requests": 50, "error_rate": 0, "p99_ms": p99, "saturation": 0.3,
	"queue_wait_ms": {"p50": 0, "p99": 0}, "overflows": 0,
}

# n slices, newest first, each with the given p99.
series(n, p99) := [slice(i * 10, p99) | some i in numbers.range(0, n - 1)]

# n slices, newest first, each with the given error rate.
failing(n, rate) := [object.union(slice(i * 10, 100), {"error_rate": rate}) | some i in numbers.range(0, n - 1)]

# n slices, newest first: queue wait p99 `wait`, TTFB p99 `ttfb`, 3 overflows each.
queueing(n, wait, ttfb) := [object.union(slice(i * 10, ttfb), {
	"queue_wait_ms": {"p50": wait / 2, "p99": wait},
	"overflows": 3,
}) |
	some i in numbers.range(0, n - 1)
]

idle(age) := object.union(slice(age, 0), {"requests": 0})

# The last n answers, newest first: failed (1) and answered (0) in turn.
alternating(n) := [bit |
	some i in numbers.range(0, n - 1)
	bit := 1 - (i % 2)
]

zeros(n) := [0 | some _ in numbers.range(1, n)]

# n slices, newest first: `masked` of each slice's 50 requests were 404s a later upstream served.
masking(n, masked) := [object.union(slice(i * 10, 100), {"masked_failures": masked}) | some i in numbers.range(0, n - 1)]

# A hung upstream: nothing ended in the slices, the requests still waiting make them slow.
hung_slice(age, waited) := object.union(idle(age), {"p99_ms": waited})

# Requests waiting now: `silent` ms without any answer, `asked` requests asked meanwhile.
waiting(n, silent, asked) := {"count": n, "oldest_ms": silent, "silent_ms": silent, "unanswered": asked}

upstream(overrides) := object.union(healthy, overrides)

healthy := {
	"role": "primary", "state": "closed", "state_age_s": 300,
	"window_s": 120, "requests": 812, "errors": 3, "not_found": 40, "timeouts": 1,
	"error_rate": 0.0037, "not_found_rate": 0.049, "masked_failures": 0,
	"ttfb_ms": {"p50": 12.1, "p90": 40.3, "p99": 790},
	"pool": {
		"limit": 64, "in_use": 20, "waiting": 0, "saturation": 0.31,
		"overflows": 0, "queue_wait_ms": {"p50": 0, "p99": 2.4},
	},
	"series": series(12, 700),
}

# Every connection busy at the moment of the tick, nobody waiting long.
busy_pool := {
	"limit": 64, "in_use": 64, "waiting": 40, "saturation": 1.6,
	"overflows": 0, "queue_wait_ms": {"p50": 1, "p99": 9},
}

queueing_pool := {
	"limit": 64, "in_use": 64, "waiting": 40, "saturation": 1.6,
	"overflows": 36, "queue_wait_ms": {"p50": 300, "p99": 900},
}

# --- one upstream, one decision ------------------------------------------------

# name -> [upstream, expected action, expected alert]
cases := {
	"healthy": [healthy, "allow", false],
	# latency: reroute after ttfb_p99_for_s of evidence
	"slow for 2 minutes": [upstream({"series": series(12, 912)}), "reroute", false],
	"slow for 3 minutes of history": [upstream({"series": series(18, 912)}), "reroute", false],
	"slow but one older slice fast": [
		upstream({"series": array.concat(series(11, 912), [slice(110, 500)])}),
		"allow", false,
	],
	"slow for 1 minute only": [
		upstream({"series": array.concat(series(6, 912), [slice(i * 10, 500) | some i in numbers.range(6, 11)])}),
		"allow", false,
	],
	"slow but series too short": [upstream({"series": series(6, 912)}), "allow", false],
	"slow but a single slice": [upstream({"series": series(1, 5000)}), "allow", false],
	"slow, current slice still empty": [
		upstream({"series": array.concat([idle(0)], array.slice(series(12, 912), 1, 12))}),
		"reroute", false,
	],
	"slow, an older slice empty": [
		upstream({"series": array.concat(array.slice(series(12, 912), 0, 5), array.concat(
			[idle(50)],
			array.slice(series(12, 912), 6, 12),
		))}),
		"allow", false,
	],
	"p99 exactly at the threshold": [upstream({"series": series(12, 800)}), "allow", false],
	# errors: the window's rate, and the rate of every slice of min_span_s
	"errors above threshold": [upstream({"error_rate": 0.08, "series": failing(12, 0.08)}), "cache", false],
	"errors in the last two slices only": [
		upstream({"error_rate": 0.08, "series": array.concat(failing(2, 0.4), series(10, 100))}),
		"cache", false,
	],
	"errors in the current slice only (one burst)": [
		upstream({"error_rate": 0.08, "series": array.concat(failing(1, 0.5), array.slice(series(12, 100), 1, 12))}),
		"allow", false,
	],
	"errors in one older slice, current idle": [
		upstream({"error_rate": 0.08, "series": array.concat([idle(0)], array.slice(failing(12, 0.5), 1, 12))}),
		"allow", false,
	],
	"errors in the window but not in the recent slices": [
		upstream({"error_rate": 0.08, "series": array.concat(series(2, 100), array.slice(failing(12, 0.5), 2, 12))}),
		"allow", false,
	],
	"errors everywhere but a fresh window of one slice": [
		upstream({"error_rate": 1, "requests": 23, "series": [object.union(slice(0, 5), {"requests": 23, "error_rate": 1})]}),
		"allow", false,
	],
	"errors exactly at threshold": [upstream({"error_rate": 0.05, "series": failing(12, 0.05)}), "allow", false],
	"errors above threshold, too few requests": [
		upstream({"error_rate": 0.5, "requests": 19, "series": failing(12, 0.5)}),
		"allow", false,
	],
	"errors above threshold, exactly min_requests": [
		upstream({"error_rate": 0.5, "requests": 20, "series": failing(12, 0.5)}),
		"cache", false,
	],
	# queueing: only when the upstream is slow at the same time, sustained, with overflows
	"queueing while slow, with overflows": [
		upstream({"pool": queueing_pool, "series": array.concat(queueing(2, 900, 1500), series(10, 100))}),
		"reject", true,
	],
	"queueing while slow, current slice idle": [
		upstream({"pool": queueing_pool, "series": array.concat([idle(0)], array.slice(queueing(3, 900, 1500), 1, 3))}),
		"allow", false,
	],
	"queueing while slow in one slice only": [
		upstream({"pool": queueing_pool, "series": array.concat(queueing(1, 900, 1500), array.slice(series(12, 100), 1, 12))}),
		"allow", false,
	],
	"queueing in front of a fast upstream (busy, not sick)": [
		upstream({"pool": queueing_pool, "series": queueing(12, 900, 40)}),
		"allow", false,
	],
	"queueing while slow, no overflow": [
		upstream({"pool": queueing_pool, "series": [object.union(s, {"overflows": 0}) | some s in queueing(2, 900, 1500)]}),
		"allow", false,
	],
	"queue wait exactly at the threshold": [
		upstream({"pool": queueing_pool, "series": queueing(2, 250, 1500)}),
		"allow", false,
	],
	"every connection busy for an instant": [
		upstream({"pool": busy_pool, "series": array.concat([object.union(slice(0, 30), {"saturation": 1.6})], array.slice(series(12, 30), 1, 12))}),
		"allow", false,
	],
	# several rules at once
	"queueing, failing and slow": [
		upstream({"pool": queueing_pool, "error_rate": 0.3, "series": [object.union(s, {"error_rate": 0.3}) | some s in queueing(12, 900, 2000)]}),
		"reject", true,
	],
	"failing and slow for 2 minutes": [
		upstream({"error_rate": 0.3, "series": [object.union(s, {"p99_ms": 2000}) | some s in failing(12, 0.3)]}),
		"cache", false,
	],
	"backup upstream, slow": [upstream({"role": "backup", "series": series(12, 912)}), "reroute", false],
	# latency counts the requests still waiting: a slice without an ended request can be slow
	"slow slices where nothing ended (hung for 2 minutes)": [
		upstream({"series": [hung_slice(i * 10, 9000) | some i in numbers.range(0, 11)]}),
		"reroute", false,
	],
	"current slice slow from waits alone, one older slice fast": [
		upstream({"series": array.concat([hung_slice(0, 5000)], array.concat(
			array.slice(series(12, 912), 1, 11),
			[slice(110, 500)],
		))}),
		"allow", false,
	],
	"current slice idle with short waits, older slices slow": [
		upstream({"series": array.concat([hung_slice(0, 20)], array.slice(series(12, 912), 1, 12))}),
		"reroute", false,
	],
	# consecutive failures: a sequence, judged at any volume and without a span
	"5 failures in a row, 5 requests in the window": [
		upstream({"requests": 5, "errors": 5, "error_rate": 1, "consecutive_failures": 5, "series": [object.union(idle(0), {"requests": 5, "error_rate": 1})]}),
		"cache", false,
	],
	"4 failures in a row": [upstream({"consecutive_failures": 4}), "allow", false],
	"many failures, none in a row": [
		upstream({"requests": 10, "errors": 5, "error_rate": 0.5, "consecutive_failures": 0, "series": [slice(0, 100)]}),
		"allow", false,
	],
	# the last answers: half of the last recent_answers failed, at any volume and without a span
	"every other answer failed, 10 answers": [
		upstream({"requests": 10, "errors": 5, "error_rate": 0.5, "last_answers": alternating(10), "series": [slice(0, 100)]}),
		"cache", false,
	],
	"5 of the last 10 failed, older ones fine": [
		upstream({"last_answers": array.concat(alternating(10), zeros(22))}),
		"cache", false,
	],
	"4 of the last 10 failed": [upstream({"last_answers": array.concat([0, 0], alternating(8))}), "allow", false],
	"every other answer failed, 9 answers only": [upstream({"last_answers": alternating(9)}), "allow", false],
	"all of the last 10 failed: a run, the consecutive rule's": [
		upstream({"consecutive_failures": 10, "last_answers": [1 | some _ in numbers.range(1, 10)]}),
		"cache", false,
	],
	"failures before the last 10 answers": [
		upstream({"last_answers": array.concat(zeros(10), [1 | some _ in numbers.range(1, 22)])}),
		"allow", false,
	],
	# stalled: asked and silent
	"hung: 3 waiting, no answer for 3.5 s": [upstream({"inflight": waiting(3, 3500, 3)}), "reroute", false],
	"hung: hedged requests, 1 waiting, 6 asked in 4 s of silence": [
		upstream({"inflight": {"count": 1, "oldest_ms": 300, "silent_ms": 4000, "unanswered": 6}}),
		"reroute", false,
	],
	"silent exactly stall_ms": [upstream({"inflight": waiting(3, 3000, 3)}), "allow", false],
	# hedges answered while silent: stall_hedged_ms is enough
	"hung: 3 requests answered by their hedges in 1.2 s of silence": [
		upstream({"inflight": {"count": 1, "oldest_ms": 150, "silent_ms": 1200, "unanswered": 4, "overtaken": 3}}),
		"reroute", false,
	],
	"2 answered by their hedges in 1.2 s of silence": [
		upstream({"inflight": {"count": 1, "oldest_ms": 150, "silent_ms": 1200, "unanswered": 4, "overtaken": 2}}),
		"allow", false,
	],
	"3 answered by their hedges, silent exactly stall_hedged_ms": [
		upstream({"inflight": {"count": 1, "oldest_ms": 150, "silent_ms": 1000, "unanswered": 4, "overtaken": 3}}),
		"allow", false,
	],
	"hedges winning, answers flowing (busy on one cold module)": [
		upstream({"inflight": {"count": 2, "oldest_ms": 2500, "silent_ms": 80, "unanswered": 1, "overtaken": 0}}),
		"allow", false,
	],
	"one slow request alone": [upstream({"inflight": waiting(1, 9000, 1)}), "allow", false],
	"requests waiting, answers flowing": [
		upstream({"inflight": {"count": 4, "oldest_ms": 5000, "silent_ms": 20, "unanswered": 3}}),
		"allow", false,
	],
	# masked failures: module requests, a rate held over min_span_s, a minimum count
	"masking everything": [
		upstream({"masked_failures": 100, "requests": 100, "not_found": 100, "series": masking(2, 50)}),
		"reroute", false,
	],
	"masking in one slice only": [
		upstream({"masked_failures": 60, "requests": 100, "series": array.concat(masking(1, 50), array.slice(series(12, 100), 1, 12))}),
		"allow", false,
	],
	"masking, too few": [
		upstream({"masked_failures": 9, "requests": 9, "series": [object.union(s, {"requests": 4.5}) | some s in masking(2, 4.5)]}),
		"allow", false,
	],
	"masking exactly half": [upstream({"masked_failures": 50, "requests": 100, "series": masking(2, 25)}), "allow", false],
	# the rate of the span, not of the window: healthy minutes before the fault do not hold it off
	"masking for 20 s after 100 s of healthy traffic": [
		upstream({"masked_failures": 100, "requests": 600, "series": array.concat(masking(2, 50), array.slice(series(12, 100), 2, 12))}),
		"reroute", false,
	],
	# masked failures in a row: a sequence, judged at any volume and without a span
	"10 masked failures in a row, 10 requests in the window": [
		upstream({"requests": 10, "not_found": 10, "masked_failures": 10, "consecutive_masked": 10, "series": [object.union(idle(0), {"requests": 10, "masked_failures": 10})]}),
		"reroute", false,
	],
	"10 masked in a row at the start of a healthy slice": [
		upstream({"masked_failures": 10, "consecutive_masked": 10, "series": array.concat([object.union(slice(0, 100), {"masked_failures": 10})], array.slice(series(12, 100), 1, 12))}),
		"reroute", false,
	],
	"9 masked failures in a row": [upstream({"masked_failures": 9, "consecutive_masked": 9}), "allow", false],
	"many masked failures, none in a row": [
		upstream({"masked_failures": 30, "consecutive_masked": 0, "series": array.concat(masking(1, 30), array.slice(series(12, 100), 1, 12))}),
		"allow", false,
	],
	"masked failures, no requests in the window": [upstream({"masked_failures": 12, "requests": 0, "series": masking(2, 50)}), "allow", false],
	"no series, no pool, no requests": [{"role": "primary"}, "allow", false],
	# integrity: one body that failed the checksum database reroutes and alerts
	"one integrity failure": [upstream({"integrity_failures": 1}), "reroute", true],
	"integrity failures, no requests otherwise": [{"role": "primary", "integrity_failures": 2}, "reroute", true],
	"integrity before queueing and errors": [
		upstream({"integrity_failures": 1, "consecutive_failures": 9}),
		"reroute", true,
	],
	# several rules at once
	"hung, then timeouts in a row": [
		upstream({"inflight": waiting(3, 16000, 8), "consecutive_failures": 5}),
		"cache", false,
	],
}

test_table if {
	got := {name: [d.action, d.alert] |
		some name, c in cases
		d := breaker.decisions.u with input as {"upstreams": {"u": c[0]}}
	}
	want := {name: [c[1], c[2]] | some name, c in cases}
	mismatches := {name: {"got": object.get(got, name, "no decision"), "want": w} |
		some name, w in want
		object.get(got, name, "no decision") != w
	}
	print("mismatches:", mismatches)
	count(mismatches) == 0
}

# --- checksum-database traffic -------------------------------------------------

sumdb_failing := {
	"state": "closed", "state_age_s": 300, "window_s": 120,
	"requests": 145, "errors": 145, "not_found": 0, "timeouts": 0,
	"error_rate": 1, "not_found_rate": 0, "masked_failures": 0,
	"ttfb_ms": {"p50": 3, "p90": 4, "p99": 5},
	"series": failing(12, 1),
}

test_sumdb_is_judged_apart_from_modules if {
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb_failing})}}
	d.action == "allow"
	d.sumdb.action == "cache"
	d.sumdb.alert == false
	d.sumdb.reason == "error rate 100.0% > 5.0% over 145 requests, for 20s"
}

test_failing_modules_leave_healthy_sumdb_traffic_alone if {
	sick := upstream({"error_rate": 0.5, "series": failing(12, 0.5), "sumdb": object.union(sumdb_failing, {"error_rate": 0, "series": series(12, 5)})})
	d := breaker.decisions.u with input as {"upstreams": {"u": sick}}
	d.action == "cache"
	d.sumdb.action == "allow"
	startswith(d.sumdb.reason, "ok: ttfb p99 5ms")
}

# Checksum traffic is routed around, never shed: the queue rule is the pool's.
test_sumdb_never_rejects if {
	slow_queue := object.union(sumdb_failing, {"error_rate": 0, "series": queueing(12, 900, 1500)})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": slow_queue})}}
	d.sumdb.action == "reroute"
	d.sumdb.reason == "ttfb p99 1500ms > 800ms for 120s"
}

test_sumdb_failures_in_a_row_trip_checksum_traffic_only if {
	sumdb := object.union(sumdb_failing, {"requests": 6, "error_rate": 1, "consecutive_failures": 6, "series": [object.union(idle(0), {"requests": 6, "error_rate": 1})]})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb})}}
	d.action == "allow"
	d.sumdb.action == "cache"
	d.sumdb.reason == "6 failures in a row (>= 5)"
}

test_sumdb_recent_failures_trip_checksum_traffic_only if {
	sumdb := object.union(sumdb_failing, {"requests": 12, "errors": 6, "error_rate": 0.5, "last_answers": alternating(12), "series": [object.union(idle(0), {"requests": 12, "error_rate": 0.5})]})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb})}}
	d.action == "allow"
	d.sumdb.action == "cache"
	d.sumdb.reason == "5 of the last 10 answers failed (>= 50.0%)"
}

test_sumdb_masked_in_a_row_reroutes_checksum_traffic_only if {
	sumdb := object.union(sumdb_failing, {"requests": 10, "errors": 0, "not_found": 10, "error_rate": 0, "not_found_rate": 1, "consecutive_masked": 10, "series": series(12, 5)})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb})}}
	d.action == "allow"
	d.sumdb.action == "reroute"
	d.sumdb.reason == "10 masked failures in a row (>= 10): 404s a later upstream served"
}

test_hung_sumdb_endpoint_is_rerouted_apart if {
	sumdb := object.union(sumdb_failing, {"error_rate": 0, "series": series(12, 5), "inflight": waiting(2, 4000, 2)})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb})}}
	d.action == "allow"
	d.sumdb.action == "reroute"
	startswith(d.sumdb.reason, "stalled: ")
}

# Checksum traffic is judged on its run of masked failures only: a sumdb input
# whose rate and slices would mask, without the run, is not rerouted.
test_sumdb_is_never_judged_on_the_masked_rate if {
	sumdb := object.union(sumdb_failing, {"error_rate": 0, "masked_failures": 145, "consecutive_masked": 9, "series": masking(12, 50)})
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"sumdb": sumdb})}}
	d.sumdb.action == "allow"
}

test_no_sumdb_in_the_input_no_sumdb_decision if {
	d := breaker.decisions.u with input as {"upstreams": {"u": healthy}}
	not d.sumdb
}

# --- the rest of the contract --------------------------------------------------

test_every_upstream_gets_a_decision if {
	ups := {sprintf("up%d", [i]): healthy | some i in numbers.range(1, 5)}
	decisions := breaker.decisions with input as {"upstreams": ups}
	object.keys(decisions) == object.keys(ups)
}

test_empty_upstreams if {
	breaker.decisions == {} with input as {"now": 0, "upstreams": {}}
}

test_reasons_carry_the_figures if {
	decisions := breaker.decisions with input as {"upstreams": {
		"slow": upstream({"series": series(12, 912.4)}),
		"mixed": upstream({"series": array.concat(series(6, 1000), array.slice(series(12, 912), 6, 12))}),
		"failing": upstream({"error_rate": 0.0821, "series": failing(12, 0.0821)}),
		"full": upstream({
			"pool": queueing_pool, "error_rate": 0.2,
			"series": [object.union(s, {"error_rate": 0.2}) | some s in queueing(2, 912, 1300)],
		}),
	}}
	decisions.slow.reason == "ttfb p99 912ms > 800ms for 120s"
	decisions.mixed.reason == "ttfb p99 912ms > 800ms for 120s"
	decisions.failing.reason == "error rate 8.2% > 5.0% over 812 requests, for 20s"
	decisions.full.reason == "queueing: wait p99 912ms > 250ms with ttfb p99 1300ms > 800ms for 20s, 6 overflows; also error rate 20.0% > 5.0% over 812 requests, for 20s"
}

# JSON may carry counts as floats (812.0): the reasons must still print them.
test_float_counts if {
	floats := [object.union(s, {"overflows": 3.0, "requests": 50.0}) | some s in queueing(2, 900, 1300)]
	full := upstream({"requests": 812.0, "error_rate": 0.2, "series": [object.union(s, {"error_rate": 0.2}) | some s in floats]})
	d := breaker.decisions.u with input as {"upstreams": {"u": full}}
	d.reason == "queueing: wait p99 900ms > 250ms with ttfb p99 1300ms > 800ms for 20s, 6 overflows; also error rate 20.0% > 5.0% over 812 requests, for 20s"
}

test_reasons_of_the_sequence_rules if {
	decisions := breaker.decisions with input as {"upstreams": {
		"dead": upstream({"consecutive_failures": 7}),
		"hung": upstream({"inflight": {"count": 3, "oldest_ms": 4210.4, "silent_ms": 4210.4, "unanswered": 5}}),
		"hedged": upstream({"inflight": {"count": 0, "oldest_ms": 0, "silent_ms": 1250.2, "unanswered": 6, "overtaken": 4.0}}),
		"masking": upstream({"masked_failures": 87.0, "requests": 100.0, "series": masking(2, 44)}),
		"edge": upstream({"masked_failures": 101, "requests": 100, "series": [object.union(s, {"masked_failures": 51}) | some s in masking(2, 50)]}),
		"all": upstream({"consecutive_failures": 5, "inflight": waiting(2, 3001, 2), "masked_failures": 100, "requests": 100, "series": masking(12, 50)}),
		"masking in a row": upstream({"masked_failures": 12.0, "consecutive_masked": 12.0}),
		"masking both ways": upstream({"masked_failures": 100, "consecutive_masked": 30, "requests": 100, "series": masking(2, 50)}),
	}}
	decisions.dead.reason == "7 failures in a row (>= 5)"
	decisions.hung.reason == "stalled: no answer for 4210ms (> 3000ms), 5 requests asked, 3 waiting"
	decisions.hedged.reason == "stalled: no answer for 1250ms (> 1000ms), 6 requests asked, 0 waiting, 4 answered by the next upstream"
	decisions.masking.reason == "masked failures: 88.0% of 100 requests were 404s a later upstream served (> 50.0%), for 20s"
	decisions.edge.reason == "masked failures: 100.0% of 100 requests were 404s a later upstream served (> 50.0%), for 20s"
	decisions.all.action == "cache"
	decisions.all.reason == "5 failures in a row (>= 5); also stalled: no answer for 3001ms (> 3000ms), 2 requests asked, 2 waiting; also masked failures: 100.0% of 100 requests were 404s a later upstream served (> 50.0%), for 20s"
	decisions["masking in a row"].action == "reroute"
	decisions["masking in a row"].reason == "12 masked failures in a row (>= 10): 404s a later upstream served"
	decisions["masking both ways"].reason == "30 masked failures in a row (>= 10): 404s a later upstream served; also masked failures: 100.0% of 100 requests were 404s a later upstream served (> 50.0%), for 20s"
}

test_allow_reason_names_waits_and_runs if {
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"consecutive_failures": 2, "inflight": waiting(1, 412.3, 1)})}}
	d.action == "allow"
	d.reason == "ok: ttfb p99 790ms, error rate 0.4% over 812 requests, queue wait p99 2ms, 0 overflows, 2 failures in a row, 1 waiting (oldest 412ms)"
	m := breaker.decisions.u with input as {"upstreams": {"u": upstream({"masked_failures": 3, "consecutive_masked": 3})}}
	m.action == "allow"
	m.reason == "ok: ttfb p99 790ms, error rate 0.4% over 812 requests, queue wait p99 2ms, 0 overflows, 3 masked failures in a row"
}

test_sequence_thresholds_come_from_data if {
	decisions := breaker.decisions with input as {"upstreams": {
		"dead": upstream({"consecutive_failures": 2}),
		"hung": upstream({"inflight": waiting(1, 1500, 1)}),
		"hedged": upstream({"inflight": {"count": 0, "oldest_ms": 0, "silent_ms": 600, "unanswered": 1, "overtaken": 1}}),
		"masking": upstream({"masked_failures": 3, "requests": 100, "series": masking(2, 2)}),
		"masking in a row": upstream({"masked_failures": 3, "consecutive_masked": 3}),
	}}
		with data.sidecar.config.thresholds as {
			"consecutive_failures": 2, "stall_ms": 1000, "stall_requests": 1,
			"stall_hedged_ms": 500, "stall_hedges": 1,
			"masked_failure_rate": 0.02, "min_masked_failures": 3,
			"consecutive_masked": 3,
		}
	decisions.dead.action == "cache"
	decisions.hung.action == "reroute"
	decisions.hedged.action == "reroute"
	decisions.masking.action == "reroute"
	decisions["masking in a row"].action == "reroute"
	decisions["masking in a row"].reason == "3 masked failures in a row (>= 3): 404s a later upstream served"
}

test_a_run_has_one_reason if {
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"consecutive_failures": 12, "last_answers": [1 | some _ in numbers.range(1, 12)]})}}
	d.reason == "12 failures in a row (>= 5)"
	e := breaker.decisions.u with input as {"upstreams": {"u": upstream({"consecutive_failures": 4, "last_answers": [1, 1, 1, 1, 0, 1, 0, 1, 0, 0]})}}
	e.reason == "6 of the last 10 answers failed (>= 50.0%)"
}

test_recent_thresholds_come_from_data if {
	decisions := breaker.decisions with input as {"upstreams": {
		"a third of 6": upstream({"last_answers": [1, 0, 0, 1, 0, 0, 0]}),
		"a third of 7": upstream({"last_answers": [0, 1, 0, 0, 1, 0, 0]}),
		"5 answers": upstream({"last_answers": [1, 0, 0, 1, 0]}),
		"floats": upstream({"last_answers": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]}),
	}}
		with data.sidecar.config.thresholds as {"recent_answers": 6, "recent_failure_rate": 0.3}
	decisions["a third of 6"].action == "cache"
	decisions["a third of 6"].reason == "2 of the last 6 answers failed (>= 30.0%)"
	decisions["a third of 7"].action == "cache"
	decisions["5 answers"].action == "allow"
	decisions.floats.reason == "2 of the last 6 answers failed (>= 30.0%)"
}

test_allow_reason if {
	d := breaker.decisions.u with input as {"upstreams": {"u": healthy}}
	d.reason == "ok: ttfb p99 790ms, error rate 0.4% over 812 requests, queue wait p99 2ms, 0 overflows"
}

test_thresholds_come_from_data if {
	d := breaker.decisions.u with input as {"upstreams": {"u": healthy}}
		with data.sidecar.config.thresholds as {"ttfb_p99_ms": 600, "ttfb_p99_for_s": 60}
	d.action == "reroute"
	d.reason == "ttfb p99 700ms > 600ms for 60s"
}

# min_span_s lengthens every span: errors over 2 slices are not enough for 30 s.
test_min_span_comes_from_data if {
	two := upstream({"error_rate": 0.3, "series": array.concat(failing(2, 0.3), series(10, 100))})
	three := upstream({"error_rate": 0.3, "series": array.concat(failing(3, 0.3), series(9, 100))})
	decisions := breaker.decisions with input as {"upstreams": {"two": two, "three": three}}
		with data.sidecar.config.thresholds as {"min_span_s": 30}
	decisions.two.action == "allow"
	decisions.three.action == "cache"
	decisions.three.reason == "error rate 30.0% > 5.0% over 812 requests, for 30s"
}

# The current slice may be idle (it may have just begun), but two slices
# must still show the queueing.
test_idle_current_slice_needs_a_longer_history if {
	u := upstream({"pool": queueing_pool, "series": array.concat([idle(0)], array.slice(queueing(3, 900, 1500), 1, 3))})
	d := breaker.decisions.u with input as {"upstreams": {"u": u}}
		with data.sidecar.config.thresholds as {"queue_for_s": 30}
	d.action == "reject"
	d.reason == "queueing: wait p99 900ms > 250ms with ttfb p99 1500ms > 800ms for 30s, 6 overflows"
}

# However small min_span_s, a rule needs two slices: one slice is one burst.
test_never_fewer_than_two_slices if {
	d := breaker.decisions.u with input as {"upstreams": {"u": upstream({"error_rate": 0.3, "series": array.concat(failing(1, 0.3), array.slice(series(12, 100), 1, 12))})}}
		with data.sidecar.config.thresholds as {"min_span_s": 0}
	d.action == "allow"
}

test_missing_threshold_keys_fall_back_to_defaults if {
	breaker.thresholds == breaker.default_thresholds with data.sidecar.config.thresholds as {}
}

test_shipped_thresholds if {
	breaker.thresholds == {
		"ttfb_p99_ms": 800, "ttfb_p99_for_s": 120, "error_rate": 0.05, "min_requests": 20,
		"queue_wait_p99_ms": 250, "queue_for_s": 20, "min_span_s": 10,
		"consecutive_failures": 5, "stall_ms": 3000, "stall_requests": 2,
		"stall_hedged_ms": 1000, "stall_hedges": 3,
		"masked_failure_rate": 0.5, "min_masked_failures": 10,
		"consecutive_masked": 10, "recent_answers": 10, "recent_failure_rate": 0.5,
	}
	breaker.thresholds == breaker.default_thresholds
	data.sidecar.config.breaker == {"cooldown_s": 30, "probes": 5}
}
