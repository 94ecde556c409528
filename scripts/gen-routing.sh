#!/usr/bin/env bash
# Prints a generated routing.yaml with N routes whose two backends are 127.0.0.1:PORT.
#   scripts/gen-routing.sh N PORT > routing.yaml
# Same shapes as benches/routing.rs: per resource /svcK/resourceJ, /svcK/resourceJ/{id}
# [GET, HEAD], /svcK/resourceJ/{id} [PUT, PATCH, DELETE], /svcK/resourceJ/{id}/sub; 50 resources
# per service; cut at N routes. Used by bench.sh and reload-time.sh.
set -euo pipefail
awk -v n="$1" -v port="$2" 'BEGIN {
    print "backends:"
    print "  legacy:\n    url: http://127.0.0.1:" port
    print "  new:\n    url: http://127.0.0.1:" port
    print "default: legacy"
    print "routes:"
    for (i = 0; i < n; i++) {
        r = int(i / 4); k = int(r / 50); j = r % 50; s = i % 4
        to = (r % 2 == 0) ? "new" : "legacy"
        if (s == 0) printf "  - name: svc%d-resource%d\n    path: /svc%d/resource%d\n    to: %s\n", k, j, k, j, to
        else if (s == 1) printf "  - name: svc%d-resource%d-read\n    path: /svc%d/resource%d/{id}\n    methods: [GET, HEAD]\n    to: new\n", k, j, k, j
        else if (s == 2) printf "  - name: svc%d-resource%d-write\n    path: /svc%d/resource%d/{id}\n    methods: [PUT, PATCH, DELETE]\n    to: %s\n", k, j, k, j, to
        else printf "  - name: svc%d-resource%d-sub\n    path: /svc%d/resource%d/{id}/sub\n    exact: %s\n    to: new\n", k, j, k, j, (r % 2 == 0) ? "true" : "false"
    }
}'
