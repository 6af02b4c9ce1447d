# METADATA
# title: Default breaker policy of goproxy-sidecar
# description: |
#   One decision per upstream in input.upstreams, from the table of the seed
#   document (chapter 5):
#     pool saturation > pool_saturation                  -> reject + alert
#     error rate > error_rate (requests >= min_requests)  -> cache
#     TTFB P99 > ttfb_p99_ms for ttfb_p99_for_s seconds  -> reroute
#   When several hold, the first in that order wins; the reason names the
#   others too. Thresholds come from data.sidecar.config.thresholds
#   (policies/thresholds.yaml). Stateless: "for 120 s" is read from the
#   per-slice series of the input, never remembered.
#
#   The rules use only what both OPA and rego-cpp (the embedded engine)
#   evaluate identically: no object.union (shallow in rego-cpp), no "some k, v
#   in" in an array or set comprehension and no arithmetic in the head of one
#   (rego-cpp 1.5.2 rejects both), numbers printed with %d of round(x) only
#   (%d of a float is an error text in OPA and undefined in rego-cpp).
package sidecar.breaker

# Defaults for any key thresholds.yaml leaves out (the seed's figures).
default_thresholds := {
	"ttfb_p99_ms": 800,
	"ttfb_p99_for_s": 120,
	"error_rate": 0.05,
	"pool_saturation": 0.9,
	"min_requests": 20,
}

default configured := {}

configured := data.sidecar.config.thresholds

thresholds := {key: value |
	some key, default_value in default_thresholds
	value := object.get(configured, key, default_value)
}

# Strongest first: load shedding protects the upstream and the sidecar's own
# queues; errors are worse than slowness, and "cache" also sends a cache miss
# on to the next upstream, so it covers what "reroute" would do.
precedence := ["reject", "cache", "reroute"]

# The output: a decision for every upstream of the input.
decisions[name] := decide(upstream) if some name, upstream in input.upstreams

decide(u) := {"action": first.action, "reason": reason, "alert": first.action == "reject"} if {
	fired := [{"action": action, "reason": why} |
		some action in precedence
		why := finding(u, action)
	]
	count(fired) > 0
	first := fired[0]
	reason := concat("; also ", [f.reason | some f in fired])
} else := {"action": "allow", "reason": healthy_reason(u), "alert": false}

# --- the three rules ---------------------------------------------------------

finding(u, "reject") := msg if {
	saturation := u.pool.saturation
	saturation > thresholds.pool_saturation
	msg := sprintf("pool saturation %s > %s (%d in use + %d waiting / %d)", [
		percent(saturation), percent(thresholds.pool_saturation),
		round(object.get(u.pool, "in_use", 0)), round(object.get(u.pool, "waiting", 0)),
		round(object.get(u.pool, "limit", 0)),
	])
}

finding(u, "cache") := msg if {
	u.requests >= thresholds.min_requests
	u.error_rate > thresholds.error_rate
	msg := sprintf("error rate %s > %s over %d requests", [
		percent(u.error_rate), percent(thresholds.error_rate), round(u.requests),
	])
}

finding(u, "reroute") := msg if {
	lowest := slow_for(u)
	msg := sprintf("ttfb p99 %s > %s for %ds", [
		millis(lowest), millis(thresholds.ttfb_p99_ms), round(thresholds.ttfb_p99_for_s),
	])
}

# --- "P99 above the threshold for ttfb_p99_for_s seconds" --------------------
#
# series holds fixed slices, newest first, age_s = index * slice width. The
# span is every slice younger than ttfb_p99_for_s. The upstream is slow when
#   - the series reaches back over the whole span (a sidecar or breaker
#     that (re)started 60 s ago cannot know about 120 s), and
#   - every slice of the span saw requests and had P99 above the threshold;
#     only the current slice (age 0) may be empty, because it may have begun
#     an instant ago.
# The value is the lowest slice P99 of the span: the figure that proves it.
slow_for(u) := lowest if {
	span_s := thresholds.ttfb_p99_for_s
	span := [s | some s in u.series; s.age_s < span_s]
	count(span) >= slices_needed(u, span_s)
	busy := [s | some s in span; s.requests > 0]
	count(busy) > 0
	every s in span {
		slow_or_starting(s)
	}
	lowest := min([s.p99_ms | some s in busy])
}

slow_or_starting(s) if {
	s.requests > 0
	s.p99_ms > thresholds.ttfb_p99_ms
}

slow_or_starting(s) if {
	s.requests == 0
	s.age_s == 0
}

slices_needed(u, span_s) := max([1, ceil(span_s / slice_width(u))])

# The series is newest first with a fixed slice width (the contract), so the
# first two ages give it. Undefined with fewer than two slices: then the
# series cannot prove any duration, and the rule does not fire.
slice_width(u) := width if {
	width := u.series[1].age_s - u.series[0].age_s
	width > 0
}

# --- reasons -----------------------------------------------------------------

healthy_reason(u) := sprintf("ok: ttfb p99 %s, error rate %s over %d requests%s, pool %s", [
	millis(object.get(u, ["ttfb_ms", "p99"], 0)),
	percent(object.get(u, "error_rate", 0)),
	round(object.get(u, "requests", 0)),
	few_requests_note(u),
	percent(object.get(u, ["pool", "saturation"], 0)),
])

few_requests_note(u) := sprintf(" (< %d: no verdict on rates)", [round(thresholds.min_requests)]) if {
	object.get(u, "requests", 0) < thresholds.min_requests
} else := ""

# 812.4 -> "812ms". Integers only: both engines print them alike.
millis(x) := sprintf("%dms", [round(x)])

# 0.0537 -> "5.4%", 0.9 -> "90.0%" (one decimal, built from integers).
percent(x) := sprintf("%d.%d%%", [floor(tenths / 10), tenths % 10]) if {
	tenths := round(x * 1000)
}
