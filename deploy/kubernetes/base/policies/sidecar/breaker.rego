# METADATA
# title: Default breaker policy of goproxy-sidecar
# description: |
#   One decision per upstream in input.upstreams, for its module traffic, and
#   one more in its "sumdb" key for its checksum-database traffic (judged on
#   input.upstreams[name].sumdb, the same stats for sumdb/ requests only):
#     integrity    any body that failed the checksum database      -> reroute + alert
#     queueing     sustained queueing while the upstream is slow   -> reject + alert
#     errors       error rate > error_rate (>= min_requests)       -> cache
#     consecutive  consecutive_failures failures in a row          -> cache
#     recent       >= recent_failure_rate of the last recent_answers
#                  answers failed                                  -> cache
#     stalled      no answer for stall_ms, stall_requests asked    -> reroute
#                  (stall_hedged_ms once stall_hedges hedges won)
#     masking      consecutive_masked masked failures in a row      -> reroute
#     masked       masked failures > masked_failure_rate (span)    -> reroute
#     latency      TTFB P99 > ttfb_p99_ms for ttfb_p99_for_s       -> reroute
#   Every rule over rates and percentiles must hold in every slice of its
#   span, the span is never shorter than min_span_s nor than two slices: one
#   tick, one burst, one slice never trips. The four rules over sequences
#   (consecutive, recent, stalled, masking) read what the sidecar counted in order: see
#   their comments. When several rules hold, the first in that order wins;
#   the reason names the others too. Thresholds come from
#   data.sidecar.config.thresholds (policies/thresholds.yaml). Stateless:
#   "for 120 s" is read from the per-slice series of the input, never
#   remembered.
#
#   The rules use only what both OPA and rego-cpp (the embedded engine)
#   evaluate identically: no object.union (shallow in rego-cpp), no "some k, v
#   in" in an array or set comprehension and no arithmetic in the head of one
#   (rego-cpp 1.5.2 rejects both), numbers printed with %d of round(x) only
#   (%d of a float is an error text in OPA and undefined in rego-cpp), and no
#   min, max or sort of numbers (rego-cpp 1.5.2 orders 12 before 2).
package sidecar.breaker

# Defaults for any key thresholds.yaml leaves out.
default_thresholds := {
	"ttfb_p99_ms": 800,
	"ttfb_p99_for_s": 120,
	"error_rate": 0.05,
	"min_requests": 20,
	"queue_wait_p99_ms": 250,
	"queue_for_s": 20,
	"min_span_s": 10,
	"consecutive_failures": 5,
	"stall_ms": 3000,
	"stall_requests": 2,
	"stall_hedged_ms": 1000,
	"stall_hedges": 3,
	"masked_failure_rate": 0.5,
	"min_masked_failures": 10,
	"consecutive_masked": 10,
	"recent_answers": 10,
	"recent_failure_rate": 0.5,
}

default configured := {}

configured := data.sidecar.config.thresholds

thresholds := {key: value |
	some key, default_value in default_thresholds
	value := object.get(configured, key, default_value)
}

# The rules in precedence order, strongest action first: load shedding
# protects an upstream that slows down under the load we send it; errors are
# worse than slowness, and "cache" also sends a cache miss on to the next
# upstream, so it covers what "reroute" would do.
module_rules := ["integrity", "queueing", "errors", "consecutive", "recent", "stalled", "masking", "masked", "latency"]

# Checksum traffic shares the upstream's connections but the queue figures
# are the pool's (they sit in the module stats), so a sick sumdb/ endpoint is
# routed around, never shed. Its masked failures come as a run only (the
# slices' masked counts are the module window's): an Athens without sumdb/
# answers 404 to every lookup the next upstream serves, a round trip each.
sumdb_rules := ["errors", "consecutive", "recent", "stalled", "masking", "latency"]

action_of := {
	"integrity": "reroute",
	"queueing": "reject",
	"errors": "cache",
	"consecutive": "cache",
	"recent": "cache",
	"stalled": "reroute",
	"masking": "reroute",
	"masked": "reroute",
	"latency": "reroute",
}

# The output: a decision for every upstream of the input, with the decision
# for its checksum-database traffic under "sumdb" when the input has one.
decisions[name] := decide_both(upstream) if some name, upstream in input.upstreams

decide_both(u) := {
	"action": module.action,
	"reason": module.reason,
	"alert": module.alert,
	"sumdb": decide(u.sumdb, sumdb_rules),
} if {
	is_object(u.sumdb)
	module := decide(u, module_rules)
} else := decide(u, module_rules)

decide(u, rules) := {"action": first.action, "reason": reason, "alert": first.alert} if {
	fired := [{"action": action_of[rule], "reason": why, "alert": object.get(alerting, rule, false)} |
		some rule in rules
		why := finding(u, rule)
	]
	count(fired) > 0
	first := fired[0]
	reason := concat("; also ", [f.reason | some f in fired])
} else := {"action": "allow", "reason": healthy_reason(u), "alert": false}

# Rules that raise the alert besides deciding: shedding load, and an upstream
# serving wrong bytes (someone must purge or fix it; rerouting only hides it).
alerting := {"queueing": true, "integrity": true}

# --- the rules -----------------------------------------------------------------

# A body that does not match the checksum database is a wrong answer, not a
# slow or failed one: one is enough, whatever the volume or span.
finding(u, "integrity") := msg if {
	n := object.get(u, "integrity_failures", 0)
	n > 0
	msg := sprintf("integrity: %d bodies did not match the checksum database", [round(n)])
}

# Busy is not sick: queueing alone (a burst, a CI fan-out against a fast
# upstream) is admission's business. It is sickness when the upstream's own
# answers are slow at the same time: it cannot keep up with what we send.
finding(u, "queueing") := msg if {
	span := sustained(u, "queue", thresholds.queue_for_s)
	overflows := sum([n | some s in span; n := object.get(s, "overflows", 0)])
	overflows > 0
	msg := sprintf("queueing: wait p99 %s > %s with ttfb p99 %s > %s for %ds, %d overflows", [
		millis(lowest([s.queue_wait_ms.p99 | some s in span; fires("queue", s)])),
		millis(thresholds.queue_wait_p99_ms),
		millis(lowest([s.p99_ms | some s in span; fires("queue", s)])),
		millis(thresholds.ttfb_p99_ms),
		span_seconds(u, span), round(overflows),
	])
}

finding(u, "errors") := msg if {
	u.requests >= thresholds.min_requests
	u.error_rate > thresholds.error_rate
	span := sustained(u, "errors", thresholds.min_span_s)
	msg := sprintf("error rate %s > %s over %d requests, for %ds", [
		percent(u.error_rate), percent(thresholds.error_rate), round(u.requests),
		span_seconds(u, span),
	])
}

# A run of failures is a sequence, not a rate (Envoy's consecutive_5xx): five
# failures in a row mean the same whether they came within a second or over
# a minute, so neither min_requests nor min_span_s applies, and a sidecar
# that sees two requests a second notices a dead upstream in seconds. The
# sidecar counts the run over time; any answer that is not a failure (a 404
# too) ends it, and overflows and clients that left are not failures, so a
# healthy upstream's scattered failures never make one.
finding(u, "consecutive") := msg if {
	object.get(u, "consecutive_failures", 0) >= thresholds.consecutive_failures
	msg := sprintf("%d failures in a row (>= %d)", [
		round(u.consecutive_failures), round(thresholds.consecutive_failures),
	])
}

# The last answers, as Envoy's failure_percentage over a request volume: an
# upstream failing every other request (an overloaded replica behind a
# balancer, one bad instance of two) never makes a run, and its error rate
# must first hold in every slice of min_span_s. A count is not a time: ten
# answers are evidence whether they came in 50 ms or in a minute, and a
# healthy upstream's scattered failures are not half of any ten of its
# answers. The sidecar keeps the last 32 answers in order, newest first (1:
# failed; a 404 is an answer, overflows and clients that left are none), so
# recent_answers above 32 never fires. A run long enough for the
# consecutive rule is that rule's to name (one reason, not two for one run).
finding(u, "recent") := msg if {
	object.get(u, "consecutive_failures", 0) < thresholds.consecutive_failures
	last := array.slice(object.get(u, "last_answers", []), 0, thresholds.recent_answers)
	count(last) == thresholds.recent_answers
	failed := sum(last)
	failed >= thresholds.recent_failure_rate * count(last)
	msg := sprintf("%d of the last %d answers failed (>= %s)", [
		round(failed), round(count(last)), percent(thresholds.recent_failure_rate),
	])
}

# Hung: asked, and silent. A hung upstream ends nothing (every request waits
# out timeouts.first_byte), so no slice has anything to show for seconds. The
# silence is its own span: silent_ms is how long the upstream has answered
# nothing while requests waited, counted by the sidecar over time, and every
# one of the stall_requests requests asked meanwhile is evidence. One slow
# request among answered ones is not a stall: any answer ends the silence.
# Hedged requests end their wait here early, so the silence is also proven by
# the next upstream: once stall_hedges requests of it were answered there
# while this one said nothing, stall_hedged_ms of silence is enough (a go
# command at 2-4 requests in flight then stops paying a hedge delay per
# request within about a second of a hang, not three).
finding(u, "stalled") := msg if {
	waits := u.inflight
	limit := stall_limit_ms(waits)
	waits.silent_ms > limit
	waits.unanswered >= thresholds.stall_requests
	msg := sprintf("stalled: no answer for %s (> %s), %d requests asked, %d waiting%s", [
		millis(waits.silent_ms), millis(limit),
		round(waits.unanswered), round(waits.count), overtaken_note(waits),
	])
}

stall_limit_ms(waits) := thresholds.stall_hedged_ms if {
	object.get(waits, "overtaken", 0) >= thresholds.stall_hedges
	thresholds.stall_hedged_ms < thresholds.stall_ms
} else := thresholds.stall_ms

overtaken_note(waits) := sprintf(", %d answered by the next upstream", [round(waits.overtaken)]) if {
	object.get(waits, "overtaken", 0) > 0
} else := ""

# Athens answers 404 when its own fetch failed, so a later upstream serving
# what this one "does not have" is a failure in disguise; every request of it
# costs a round trip before the backup. Module requests only (the input's
# sumdb has none): a proxy that does not serve sumdb/ answers 404 by design.
# The rate is judged over the span, not the window: two minutes of healthy
# traffic before the fault would otherwise hold it off for as long again.
finding(u, "masked") := msg if {
	u.masked_failures >= thresholds.min_masked_failures
	u.requests > 0
	span := sustained(u, "masked", thresholds.min_span_s)
	asked := sum([s.requests | some s in span])
	asked > 0
	masked := sum([n | some s in span; n := object.get(s, "masked_failures", 0)])
	msg := sprintf("masked failures: %s of %d requests were 404s a later upstream served (> %s), for %ds", [
		percent(at_most(1, masked / asked)), round(asked),
		percent(thresholds.masked_failure_rate), span_seconds(u, span),
	])
}

# The masked failures' run, as "consecutive" is the failures' (Envoy's
# consecutive_gateway_failure): a dead Athens answers 404 to everything and
# the backup serves each one, so ten in a row are ten proofs whatever the
# volume, and the slice in which the fault began (mostly healthy traffic)
# cannot hold the rule off as it holds off the rate in "masked". The
# sidecar counts the run over each traffic class apart: an answer of this
# upstream that serves (2xx) ends it; a 404 that no later upstream served
# (a module that exists nowhere, such as the go command's path-prefix
# lookups) neither ends nor extends it, so no number of them trips a
# healthy Athens, nor hides a dead one.
finding(u, "masking") := msg if {
	object.get(u, "consecutive_masked", 0) >= thresholds.consecutive_masked
	msg := sprintf("%d masked failures in a row (>= %d): 404s a later upstream served", [
		round(u.consecutive_masked), round(thresholds.consecutive_masked),
	])
}

finding(u, "latency") := msg if {
	span := sustained(u, "latency", thresholds.ttfb_p99_for_s)
	msg := sprintf("ttfb p99 %s > %s for %ds", [
		millis(lowest([s.p99_ms | some s in span; fires("latency", s)])),
		millis(thresholds.ttfb_p99_ms), span_seconds(u, span),
	])
}

# What one slice must show for a rule to hold in it.

# No "requests > 0": a slice's p99 counts the requests that were still
# waiting when it ended (or, for the current one, that wait now), so a slice
# in which a hung upstream answered nothing is slow, not idle.
fires("latency", s) if {
	s.p99_ms > thresholds.ttfb_p99_ms
}

fires("errors", s) if {
	s.requests > 0
	s.error_rate > thresholds.error_rate
}

fires("masked", s) if {
	s.requests > 0
	object.get(s, "masked_failures", 0) > thresholds.masked_failure_rate * s.requests
}

fires("queue", s) if {
	s.queue_wait_ms.p99 > thresholds.queue_wait_p99_ms
	s.p99_ms > thresholds.ttfb_p99_ms
}

# --- "in every slice of the last for_s seconds" -------------------------------
#
# series holds fixed slices, newest first, age_s = index * slice width. The
# span is the newest slices covering max(for_s, min_span_s), and never fewer
# than two. The rule holds (and the span is returned) when
#   - the series reaches back over the whole span (a sidecar or breaker that
#     (re)started 60 s ago cannot know about 120 s),
#   - the rule fires in every slice of the span; only the current slice (age
#     0) may be idle instead, because it may have begun an instant ago, and
#   - it fires in at least two slices: one slice is one burst.
# (Counted, not "every": one pass over the span, and this runs for every
# rule of every upstream at every tick.)
sustained(u, rule, for_s) := span if {
	# Cheap first: the newest complete slice is in every span and must fire.
	fires(rule, u.series[1])
	width := slice_width(u)
	needed := at_least(2, ceil(at_least(thresholds.min_span_s, for_s) / width))
	span := array.slice(u.series, 0, needed)
	count(span) == needed
	firing := count([s | some s in span; fires(rule, s)])
	firing >= 2
	firing + starting(rule, span) == needed
}

# 1 when the current slice (always span[0]) is idle and does not fire: it
# may have begun an instant ago. (A latency slice may fire without a request
# ended in it: requests still waiting count.)
starting(rule, span) := 1 if {
	span[0].requests == 0
	not fires(rule, span[0])
} else := 0

# The figures that prove a rule: the lowest of the span. (Not min(): see above.)
lowest(xs) := x if {
	some x in xs
	every y in xs {
		x <= y
	}
}

at_least(floor_value, x) := x if x >= floor_value

else := floor_value

# A masked failure is counted when the later upstream's answer lands, its
# request when the 404 did: a slice edge between them may put more of the
# first than of the second in a span.
at_most(ceiling, x) := x if x <= ceiling

else := ceiling

span_seconds(u, span) := round(count(span) * slice_width(u))

# The series is newest first with a fixed slice width (the contract), so the
# first two ages give it. Undefined with fewer than two slices: then the
# series cannot prove any duration, and no rule fires.
slice_width(u) := width if {
	width := u.series[1].age_s - u.series[0].age_s
	width > 0
}

# --- reasons -----------------------------------------------------------------

healthy_reason(u) := sprintf("ok: ttfb p99 %s, error rate %s over %d requests%s%s%s%s%s", [
	millis(object.get(u, ["ttfb_ms", "p99"], 0)),
	percent(object.get(u, "error_rate", 0)),
	round(object.get(u, "requests", 0)),
	few_requests_note(u),
	pool_note(u),
	run_note(u),
	masked_run_note(u),
	waiting_note(u),
])

run_note(u) := sprintf(", %d failures in a row", [round(u.consecutive_failures)]) if {
	u.consecutive_failures > 0
} else := ""

masked_run_note(u) := sprintf(", %d masked failures in a row", [round(u.consecutive_masked)]) if {
	u.consecutive_masked > 0
} else := ""

waiting_note(u) := sprintf(", %d waiting (oldest %s)", [round(u.inflight.count), millis(u.inflight.oldest_ms)]) if {
	u.inflight.count > 0
} else := ""

few_requests_note(u) := sprintf(" (< %d: no verdict on rates)", [round(thresholds.min_requests)]) if {
	object.get(u, "requests", 0) < thresholds.min_requests
} else := ""

pool_note(u) := sprintf(", queue wait p99 %s, %d overflows", [
	millis(object.get(u.pool, ["queue_wait_ms", "p99"], 0)),
	round(object.get(u.pool, "overflows", 0)),
]) if {
	is_object(u.pool)
} else := ""

# 812.4 -> "812ms". Integers only: both engines print them alike.
millis(x) := sprintf("%dms", [round(x)])

# 0.0537 -> "5.4%", 0.9 -> "90.0%" (one decimal, built from integers).
percent(x) := sprintf("%d.%d%%", [floor(tenths / 10), tenths % 10]) if {
	tenths := round(x * 1000)
}
