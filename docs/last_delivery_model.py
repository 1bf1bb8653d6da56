"""A queueing model of a message's last delivery (docs/throttling.md, "A warm-up before the
first hand-back").

Returns arrive as a Poisson stream at `rho` times the quota `Q`. `I` instances poll a shared
queue every 20 ms when idle and take up to 10 visible messages per invocation; each instance
sends through its own token bucket at its fair share `Q / I` (one second deep), and every call
needs a token of the API's bucket (rate `Q`, depth `burst`); a call with none is throttled and
tried again at the instance's next token. An invocation lasts until its last call has answered
(50 ms each). Printed: the share of instance time spent in invocations (billed), the share of
calls throttled, and the API's use of its quota.

    python3 docs/last_delivery_model.py Q burst I [seconds]
    python3 docs/last_delivery_model.py 10 10 3 200     # scenario A
    python3 docs/last_delivery_model.py 20 20 5 150     # scenario B
"""
import random
import sys


def run(Q, b, I, rho, T, dt=0.001, lat=0.05, seed=1):
    rnd = random.Random(seed)
    share = Q / I
    api = b
    tokens = [share] * I
    visible = 0
    invocations = [None] * I
    poll_next = [0.0] * I
    busy = 0.0
    calls = throttled = done = 0
    for step in range(int(T / dt)):
        t = step * dt
        api = min(b, api + Q * dt)
        for i in range(I):
            tokens[i] = min(share, tokens[i] + share * dt)
        if rnd.random() < rho * Q * dt:
            visible += 1
        for i in range(I):
            if invocations[i] is None:
                if visible and t >= poll_next[i]:
                    k = min(10, visible)
                    visible -= k
                    invocations[i] = {"pending": k, "inflight": []}
                else:
                    if t >= poll_next[i]:
                        poll_next[i] = t + 0.02
                    continue
            inv = invocations[i]
            busy += dt
            inv["inflight"] = [end for end in inv["inflight"] if end > t]
            while inv["pending"] and tokens[i] >= 1:
                tokens[i] -= 1
                calls += 1
                if api >= 1:
                    api -= 1
                    inv["pending"] -= 1
                    inv["inflight"].append(t + lat)
                    done += 1
                else:
                    throttled += 1
                    break
            if not inv["pending"] and not inv["inflight"]:
                invocations[i] = None
                poll_next[i] = t
    return busy / (I * T), throttled / max(calls, 1), done / (Q * T)


def main():
    Q, burst, I = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    T = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
    print("Q=%g burst=%g instances=%d, %g s" % (Q, burst, I, T))
    print("rho   billed  429%  quota used")
    for rho in (0.85, 0.9, 0.93, 0.95):
        billed, throttled, used = run(Q, burst, I, rho, T)
        print("%.2f  %.2f   %5.1f  %.2f" % (rho, billed, throttled * 100, used))


if __name__ == "__main__":
    main()
