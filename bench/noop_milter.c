/* A milter that does nothing, as fast as C and sendmail's libmilter allow: the
   ceiling for any milter on this machine. It asks for no HELO/DATA/unknown callbacks
   and answers every other one (a "no reply" negotiation for headers and body would
   make Postfix's Nagle wait for libmilter's delayed ACKs, ~40 ms a message, which
   sms-milter avoids with TCP_QUICKACK and libmilter cannot). DISCARD at end of message,
   like an SMS mail that became jobs. Usage: noop_milter inet:PORT@127.0.0.1 */
#include <stdio.h>
#include <string.h>
#include <libmilter/mfapi.h>

static sfsistat n_conn(SMFICTX *c, char *h, _SOCK_ADDR *a) { return SMFIS_CONTINUE; }
static sfsistat n_from(SMFICTX *c, char **a) { return SMFIS_CONTINUE; }
static sfsistat n_rcpt(SMFICTX *c, char **a) { return SMFIS_CONTINUE; }
static sfsistat n_hdr(SMFICTX *c, char *f, char *v) { return SMFIS_CONTINUE; }
static sfsistat n_eoh(SMFICTX *c) { return SMFIS_CONTINUE; }
static sfsistat n_body(SMFICTX *c, unsigned char *b, size_t l) { return SMFIS_CONTINUE; }
static sfsistat n_eom(SMFICTX *c) { return SMFIS_DISCARD; }
static sfsistat n_neg(SMFICTX *c, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
                      unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
  *pf0 = SMFIF_DELRCPT;
  *pf1 = (SMFIP_NOHELO | SMFIP_NODATA | SMFIP_NOUNKNOWN) & f1;
  *pf2 = 0; *pf3 = 0;
  return SMFIS_CONTINUE;
}
int main(int argc, char **argv) {
  struct smfiDesc d;
  memset(&d, 0, sizeof d);
  d.xxfi_name = "noop"; d.xxfi_version = SMFI_VERSION; d.xxfi_flags = SMFIF_DELRCPT;
  d.xxfi_connect = n_conn; d.xxfi_envfrom = n_from; d.xxfi_envrcpt = n_rcpt; d.xxfi_header = n_hdr;
  d.xxfi_eoh = n_eoh; d.xxfi_body = n_body; d.xxfi_eom = n_eom; d.xxfi_negotiate = n_neg;
  if (argc < 2 || smfi_setconn(argv[1]) == MI_FAILURE || smfi_register(d) == MI_FAILURE) return 1;
  return smfi_main() == MI_SUCCESS ? 0 : 1;
}
