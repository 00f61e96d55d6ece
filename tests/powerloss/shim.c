/*
 * Power-loss simulation for the integration test `tests/it/powerloss.rs` (test code only: the
 * crate's `unsafe_code = "forbid"` is about its Rust).
 *
 * Loaded with LD_PRELOAD into the real `botrelay` binary. It wraps fsync and fdatasync: after a
 * successful sync of a regular file directly in $POWERLOSS_DIR, it copies the file's whole
 * content, as it is now, to $POWERLOSS_SHADOW/<name> (through a temporary file and a rename, so
 * that a kill in the middle leaves the previous image). The shadow directory therefore holds
 * what a disk would be guaranteed to hold after a power loss: each file as of its last fsync,
 * and nothing of the writes made since. A file never synced has no image: it is lost. unlink
 * removes the image too (a deleted rollback journal must not come back).
 *
 * The test kills the relay with SIGKILL at some point, replaces $POWERLOSS_DIR's files with
 * the images ("the power came back"), and checks that every acknowledged event is there.
 *
 * The copy runs before fsync returns, so whoever waited for the fsync (the syncer, before it
 * lets the relay answer 200) is answered only once the image holds what it synced.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t copying = PTHREAD_MUTEX_INITIALIZER;

/* The file's name when `path` is a file directly in $POWERLOSS_DIR, else NULL. */
static const char *watched_name(const char *path) {
    const char *dir = getenv("POWERLOSS_DIR");
    if (dir == NULL || path == NULL) {
        return NULL;
    }
    size_t length = strlen(dir);
    if (strncmp(path, dir, length) != 0 || path[length] != '/') {
        return NULL;
    }
    const char *name = path + length + 1;
    if (*name == '\0' || strchr(name, '/') != NULL) {
        return NULL;
    }
    return name;
}

static int write_all(int fd, const char *bytes, ssize_t count) {
    while (count > 0) {
        ssize_t written = write(fd, bytes, (size_t)count);
        if (written < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        bytes += written;
        count -= written;
    }
    return 0;
}

/* Copies the synced file behind `fd` to its image in $POWERLOSS_SHADOW. */
static void keep_image(int fd) {
    const char *shadow = getenv("POWERLOSS_SHADOW");
    struct stat status;
    if (shadow == NULL || fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
        return;
    }
    char link[64];
    char path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, path, sizeof path - 1);
    if (length <= 0) {
        return;
    }
    path[length] = '\0';
    const char *name = watched_name(path);
    if (name == NULL) {
        return;
    }
    char temporary[PATH_MAX];
    char image[PATH_MAX];
    snprintf(temporary, sizeof temporary, "%s/%s.tmp", shadow, name);
    snprintf(image, sizeof image, "%s/%s", shadow, name);
    int saved = errno;
    pthread_mutex_lock(&copying);
    int in = open(path, O_RDONLY | O_CLOEXEC);
    int out = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int ok = in >= 0 && out >= 0;
    static char buffer[1 << 16];
    while (ok) {
        ssize_t count = read(in, buffer, sizeof buffer);
        if (count < 0 && errno == EINTR) {
            continue;
        }
        if (count <= 0) {
            ok = count == 0;
            break;
        }
        ok = write_all(out, buffer, count) == 0;
    }
    if (in >= 0) {
        close(in);
    }
    if (out >= 0) {
        close(out);
    }
    if (ok) {
        rename(temporary, image);
    } else {
        fprintf(stderr, "powerloss shim: cannot copy %s\n", path);
    }
    pthread_mutex_unlock(&copying);
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    int result = real(fd);
    if (result == 0) {
        keep_image(fd);
    }
    return result;
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    int result = real(fd);
    if (result == 0) {
        keep_image(fd);
    }
    return result;
}

static void forget_image(const char *path) {
    const char *name = watched_name(path);
    const char *shadow = getenv("POWERLOSS_SHADOW");
    if (name == NULL || shadow == NULL) {
        return;
    }
    char image[PATH_MAX];
    snprintf(image, sizeof image, "%s/%s", shadow, name);
    int saved = errno;
    pthread_mutex_lock(&copying);
    unlink(image);
    pthread_mutex_unlock(&copying);
    errno = saved;
}

int unlink(const char *path) {
    static int (*real)(const char *) = NULL;
    if (real == NULL) {
        real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    }
    int result = real(path);
    if (result == 0 && path[0] == '/') {
        forget_image(path);
    }
    return result;
}

int unlinkat(int dirfd, const char *path, int flags) {
    static int (*real)(int, const char *, int) = NULL;
    if (real == NULL) {
        real = (int (*)(int, const char *, int))dlsym(RTLD_NEXT, "unlinkat");
    }
    int result = real(dirfd, path, flags);
    if (result == 0 && path[0] == '/') {
        forget_image(path);
    }
    return result;
}
