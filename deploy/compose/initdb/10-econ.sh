#!/bin/sh
# The example source: an invoice table, and a role that may replicate it.
set -eu
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" <<SQL
CREATE ROLE oppen LOGIN REPLICATION PASSWORD '${OPPEN_DB_PASSWORD}';
CREATE TABLE supplier_invoices (
  invoice_id bigint PRIMARY KEY,
  supplier text NOT NULL,
  supplier_orgnr varchar(11),
  amount numeric(18,2),
  posted date,
  notes text,
  clerk_email text
);
ALTER TABLE supplier_invoices OWNER TO oppen;
INSERT INTO supplier_invoices
SELECT g, 'Leverantör ' || (g % 97), '556' || lpad(g::text, 6, '0'), (g * 37 % 100000) / 100.0,
       date '2025-01-01' + (g % 365), 'Faktura ' || g, 'clerk' || g || '@exempel.se'
FROM generate_series(1, 10000) g;
SQL
