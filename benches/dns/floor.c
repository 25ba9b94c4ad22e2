/* The floor for benches/dns/run.sh: a UDP server that does no DNS work at all.
 *
 * It answers each datagram with itself, the QR bit set, in the loop of edgepop's recvmmsg
 * path (a blocking recvmmsg that returns once one datagram is in, then one sendmmsg for the
 * batch). What it
 * costs per query is what the kernel charges any server on this machine and load: receiving,
 * sending over loopback (including waking the client) and sleeping between bursts. A real
 * server's CPU per query minus this is the part its own code controls.
 *
 * usage: floor PORT   (binds 127.0.0.1:PORT; runs until killed)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 32
#define QUERY_MAX 4096

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("floor: bind");
        return 1;
    }
    static unsigned char bufs[BATCH][QUERY_MAX];
    static struct sockaddr_storage peers[BATCH];
    struct iovec iov[BATCH], out_iov[BATCH];
    struct mmsghdr in[BATCH], out[BATCH];
    for (;;) {
        memset(in, 0, sizeof in);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = QUERY_MAX;
            in[i].msg_hdr.msg_name = &peers[i];
            in[i].msg_hdr.msg_namelen = sizeof peers[i];
            in[i].msg_hdr.msg_iov = &iov[i];
            in[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(s, in, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0)
            continue;
        int k = 0;
        memset(out, 0, sizeof(struct mmsghdr) * n);
        for (int i = 0; i < n; i++) {
            if (in[i].msg_len < 12)
                continue;
            bufs[i][2] |= 0x84; /* QR, AA */
            out_iov[k].iov_base = bufs[i];
            out_iov[k].iov_len = in[i].msg_len;
            out[k].msg_hdr.msg_name = &peers[i];
            out[k].msg_hdr.msg_namelen = in[i].msg_hdr.msg_namelen;
            out[k].msg_hdr.msg_iov = &out_iov[k];
            out[k].msg_hdr.msg_iovlen = 1;
            k++;
        }
        for (int sent = 0; sent < k;) {
            int r = sendmmsg(s, out + sent, k - sent, 0);
            sent += r > 0 ? r : 1;
        }
    }
}
