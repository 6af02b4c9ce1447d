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
	"no series, no pool, no requests": [{"role": "primary"}, "allow", false],
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
	}
	breaker.thresholds == breaker.default_thresholds
	data.sidecar.config.breaker == {"cooldown_s": 30, "probes": 5}
}
