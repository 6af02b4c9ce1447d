"""The GOPROXY request path: parse, route through the plan, stream, record."""
