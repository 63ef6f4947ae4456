# Shell helpers of the benchmark scripts (bench/postgres, bench/s3,
# bench/transport, bench/export_drop), sourced from the repository's root.

# Builds with cargo for `profile` (release or debug) what the arguments name.
cargo_build() {  # profile cargo-args...
  local profile=$1
  shift
  if [[ $profile == release ]]; then
    cargo build --release --locked --quiet "$@"
  else
    cargo build --locked --quiet "$@"
  fi
}

# The oppen binary to measure: OPPEN_BIN (two builds side by side), else this
# checkout's, built for `profile`.
oppen_bin() {  # profile
  if [[ -n ${OPPEN_BIN:-} ]]; then
    echo "$OPPEN_BIN"
  else
    cargo_build "$1" --bin oppen || return
    echo "$PWD/target/$1/oppen"
  fi
}

# A TCP port free on loopback now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# CPU seconds (user + system) of process `pid` so far, from /proc: its own, or
# with `reaped` those of its ended children it has waited for (a server's
# backends). The fields are counted after the command name, which may hold spaces.
cpu_of() {  # pid [reaped]
  local fields='$12 + $13'
  [[ ${2:-} == reaped ]] && fields='$14 + $15'
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" "{ printf \"%.2f\\n\", ($fields) / hz }"
}

# CPU seconds process `pid` spent since `before`, a reading of cpu_of.
cpu_since() {  # pid before
  echo "$(cpu_of "$1") - $2" | bc -l | xargs printf '%.2f\n'
}
