# Table-driven tests of the default breaker policy: `opa test policies/`.
# Each case is one upstream in the input shape of DESIGN.md; the thresholds
# are the shipped ones (thresholds.yaml) unless a test overrides them.
package sidecar.breaker_test

import data.sidecar.breaker

# n slices of 10 s, newest first, each with the given p99.
series(n, p99) := [slice(i * 10, p99) | some i in numbers.range(0, n - 1)]

slice(age, p99) := {"age_s": age, "requests": 50, "error_rate": 0, "p99_ms": p99, "saturation": 0.3}

upstream(overrides) := object.union(healthy, overrides)

healthy := {
	"role": "primary", "state": "closed", "state_age_s": 300,
	"window_s": 120, "requests": 812, "errors": 3, "not_found": 40, "timeouts": 1,
	"error_rate": 0.0037, "not_found_rate": 0.049, "masked_failures": 0,
	"ttfb_ms": {"p50": 12.1, "p90": 40.3, "p99": 790},
	"pool": {"limit": 64, "in_use": 20, "waiting": 0, "saturation": 0.31},
	"series": series(12, 700),
}

saturated_pool := {"limit": 64, "in_use": 60, "waiting": 4, "saturation": 1}

# name -> [upstream, expected action, expected alert]
cases := {
	"healthy": [healthy, "allow", false],
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
		upstream({"series": array.concat([object.union(slice(0, 0), {"requests": 0})], array.slice(series(12, 912), 1, 12))}),
		"reroute", false,
	],
	"slow, an older slice empty": [
		upstream({"series": array.concat(array.slice(series(12, 912), 0, 5), array.concat(
			[object.union(slice(50, 0), {"requests": 0})],
			array.slice(series(12, 912), 6, 12),
		))}),
		"allow", false,
	],
	"p99 exactly at the threshold": [upstream({"series": series(12, 800)}), "allow", false],
	"errors above threshold": [upstream({"error_rate": 0.08}), "cache", false],
	"errors exactly at threshold": [upstream({"error_rate": 0.05}), "allow", false],
	"errors above threshold, too few requests": [upstream({"error_rate": 0.5, "requests": 19}), "allow", false],
	"errors above threshold, exactly min_requests": [upstream({"error_rate": 0.5, "requests": 20}), "cache", false],
	"pool saturated": [upstream({"pool": saturated_pool}), "reject", true],
	"pool at the threshold": [upstream({"pool": object.union(saturated_pool, {"saturation": 0.9})}), "allow", false],
	"saturated, failing and slow": [
		upstream({"pool": saturated_pool, "error_rate": 0.3, "series": series(12, 2000)}),
		"reject", true,
	],
	"failing and slow": [upstream({"error_rate": 0.3, "series": series(12, 2000)}), "cache", false],
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
		"failing": upstream({"error_rate": 0.0821}),
		"full": upstream({"pool": saturated_pool, "error_rate": 0.2}),
	}}
	decisions.slow.reason == "ttfb p99 912ms > 800ms for 120s"
	decisions.failing.reason == "error rate 8.2% > 5.0% over 812 requests"
	decisions.full.reason == "pool saturation 100.0% > 90.0% (60 in use + 4 waiting / 64); also error rate 20.0% > 5.0% over 812 requests"
}

# JSON may carry counts as floats (812.0): the reasons must still print them.
test_float_counts if {
	full := upstream({"requests": 812.0, "error_rate": 0.2, "pool": {"limit": 64.0, "in_use": 60.0, "waiting": 4.0, "saturation": 1.0}})
	d := breaker.decisions.u with input as {"upstreams": {"u": full}}
	d.reason == "pool saturation 100.0% > 90.0% (60 in use + 4 waiting / 64); also error rate 20.0% > 5.0% over 812 requests"
}

test_allow_reason if {
	d := breaker.decisions.u with input as {"upstreams": {"u": healthy}}
	d.reason == "ok: ttfb p99 790ms, error rate 0.4% over 812 requests, pool 31.0%"
}

test_thresholds_come_from_data if {
	d := breaker.decisions.u with input as {"upstreams": {"u": healthy}}
		with data.sidecar.config.thresholds as {"ttfb_p99_ms": 600, "ttfb_p99_for_s": 60}
	d.action == "reroute"
	d.reason == "ttfb p99 700ms > 600ms for 60s"
}

test_missing_threshold_keys_fall_back_to_defaults if {
	breaker.thresholds == breaker.default_thresholds with data.sidecar.config.thresholds as {}
}

test_shipped_thresholds_are_the_seed_figures if {
	breaker.thresholds == {
		"ttfb_p99_ms": 800, "ttfb_p99_for_s": 120, "error_rate": 0.05,
		"pool_saturation": 0.9, "min_requests": 20,
	}
	data.sidecar.config.breaker == {"cooldown_s": 30, "probes": 5}
}
