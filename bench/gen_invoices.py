#!/usr/bin/env python3
"""Writes a synthetic supplier-invoice full dump like the economy system's exports.

usage: gen_invoices.py ROWS OUT.csv [--change-from PREVIOUS.csv --percent 1]

With --change-from, writes the previous dump with PERCENT of the rows changed
(amount corrections), all in the two newest months, as corrections are in practice.
"""
import argparse, csv, random

FORV = ["Kommunstyrelseförvaltningen", "Utbildningsförvaltningen", "Socialförvaltningen",
        "Miljöförvaltningen", "Tekniska förvaltningen", "Kultur- och fritidsförvaltningen"]
KONTO = [("4010", "Inköp av material"), ("5410", "Förbrukningsinventarier"), ("6110", "Kontorsmateriel"),
         ("6540", "IT-tjänster"), ("6550", "Konsulttjänster"), ("4690", "Köp av huvudverksamhet, individ- och familjeomsorg")]
NAMES = ["Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson", "Olsson", "Persson", "Svensson", "Gustafsson"]
KINDS = ["Bygg AB", "Kontorsmaterial AB", "El & Co AB", "Transport HB", "Konsult AB", "Städ AB", "Data AB"]
TEXT = ["Avser ramavtal", "Årsavgift 2025", "Licens, 12 mån", "Direktupphandling", "Kreditering", "",
        "Faktura \"brådskande\", avser\nflera rader; se bilaga"]


def luhn(nine):
    s = 0
    for i, ch in enumerate(nine):
        v = int(ch) * (2 if i % 2 == 0 else 1)
        s += v - 9 if v > 9 else v
    return str((10 - s % 10) % 10)


def orgnr(rng):
    nine = "%d%d%02d%05d" % (rng.randint(2, 9), rng.randint(0, 9), rng.randint(20, 99), rng.randint(0, 99999))
    return "%s-%s%s" % (nine[:6], nine[6:], luhn(nine))


def pnr(rng):
    nine = "%02d%02d%02d%03d" % (rng.randint(40, 99), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 999))
    return "%s-%s%s" % (nine[:6], nine[6:], luhn(nine))


def rows(n, seed=7):
    rng = random.Random(seed)
    suppliers = [(f"{rng.choice(NAMES)}s {rng.choice(KINDS)}", orgnr(rng)) for _ in range(4000)]
    suppliers += [(f"{rng.choice(NAMES)} Enskild firma", pnr(rng)) for _ in range(500)]
    for i in range(n):
        name, sid = rng.choice(suppliers)
        konto, ktext = rng.choice(KONTO)
        text = rng.choice(TEXT)
        r = rng.random()
        if r < 0.03:
            text = f"Ersättning avser {pnr(rng)}, jan"
        elif r < 0.05:
            text = f"Kontakt: {rng.choice(NAMES).lower()}@exempel.se"
        month = 1 + i * 12 // n
        yield [str(10_000_000 + i), f"F{rng.randint(100000, 999999)}", f"2025-{month:02d}-{rng.randint(1, 28):02d}",
               rng.choice(FORV), name, sid, konto, ktext, f"{rng.randint(100, 99999)},{rng.randint(0, 99):02d}",
               text, f"{rng.choice(NAMES).lower()}@kommun.exempel.se"]


HEADER = ["verifikationsnummer", "fakturanummer", "bokforingsdatum", "forvaltning", "leverantor", "leverantor_id",
          "konto_nr", "konto_text", "belopp", "beskrivning", "handlaggare_epost"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=int)
    ap.add_argument("out")
    ap.add_argument("--change-from")
    ap.add_argument("--percent", type=float, default=1.0)
    a = ap.parse_args()
    with open(a.out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=";", lineterminator="\r\n")
        w.writerow(HEADER)
        if a.change_from:
            with open(a.change_from, encoding="utf-8", newline="") as prev:
                r = csv.reader(prev, delimiter=";")
                next(r)
                old = list(r)
            newest = [i for i, row in enumerate(old) if row[2] >= "2025-11"]
            rng = random.Random(11)
            for i in rng.sample(newest, min(len(newest), int(len(old) * a.percent / 100))):
                old[i][8] = f"{rng.randint(100, 99999)},{rng.randint(0, 99):02d}"
            w.writerows(old)
        else:
            w.writerows(rows(a.rows))


if __name__ == "__main__":
    main()
